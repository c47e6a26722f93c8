# `make run`  : create .venv, install, generate stubs, install nats-server if missing (apt), start the
#               broker (RocksDB under ./data)
# `make test` : create .venv, install with test deps, generate stubs, install nats-server and chromium
#               if missing (apt: the NATS/JetStream source tests run a real nats-server, the console
#               tests drive Chromium through Playwright), run the whole suite
# `make lint` : ruff (rules in pyproject [tool.ruff]) over broker/, client/, tests/ and bench/, and mypy
#               ([tool.mypy]) over broker/, client/ and bench/
# `make bench`: bench/run.py, the one benchmark: W1/W2/W3 (issue 4) against fresh brokers, both
#               doors, WAL and fsync; a table + bench/results/<time>.json. Takes ARGS, e.g.
#               ARGS=--quick, ARGS='--workloads w3 --durability wal' (bench/README.md lists them)
# `make bench-compare`: installs nats-server and clickhouse-server (apt) and kinesalite (npm,
#               bench/.peers; nats-py is a runtime dependency), then the same suite plus the peers:
#               bench/run.py --compare, and the Timeplus door's T1 beside ClickHouse's insert
#               (bench/run.py timeplus --workloads t1 --clickhouse yes); also victoria-metrics and
#               influxdb (apt) for the OpenTSDB door's figures (bench/run.py tsdb --peers yes)
# `make bench-tsdb`: the OpenTSDB door (issue 10): /api/put points/s over 10,000 series and the
#               /api/query latency of one series (bench/run.py tsdb); takes ARGS, e.g. ARGS=--quick,
#               ARGS='--peers yes' (VictoriaMetrics and InfluxDB beside; make bench-peers installs them),
#               ARGS='--peers yes --workloads put --passes 5' (issue 10's targets, on medians of 5 passes)
# `make bench-timeplus`: the Timeplus door's T1-T4 (issue 8) on fresh brokers, ClickHouse beside T1
#               when clickhouse-server is installed; takes ARGS, e.g. ARGS='--quick', ARGS='--minutes 1'
# `make bench-sources`: rows/s from a JetStream source into Sluice (1 KiB JSON messages) beside a
#               plain nats-py pull consumer draining the same stream (bench/run.py sources, takes ARGS,
#               e.g. ARGS='--messages 50000')
# `make cluster`: a local cluster (issue 13): a 3-node NATS JetStream cluster and two brokers on it
#               (--store jetstream --replicas 3) on loopback, data under ./cluster-data; prints the
#               addresses, Ctrl-C stops all (broker/cluster.py; takes ARGS, e.g. ARGS='--dir /tmp/c')
# `make bench-memory`: broker RSS with 1,000,000 records stored, then over a 5-minute W1 loop
#               (bench/run.py memory, takes ARGS, e.g. ARGS='--minutes 0.5 --records 400000')
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)
STUBS := client/_pb/sluice/v1/sluice_pb2.py
ARGS ?=
# Two worker processes, each taking whole test files (their module-scoped brokers and servers stay
# one per file): most of a test's time is a broker or a server starting and waiting, so this halves
# the run (CI: ~16 -> ~9 min on two cores). PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install proto nats-server chromium run cluster test lint bench bench-compare bench-memory bench-peers bench-sources \
	bench-timeplus wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

$(STUBS): $(STAMP) $(wildcard protos/sluice/v1/*.proto) tools/genproto.py
	$(PY) tools/genproto.py . > /dev/null

proto: $(STUBS)

# Debian's nats-server (in /usr/sbin, not always on a user's PATH): the `nats`/`nats_jetstream`
# sources' tests and benchmark run a real one; CI installs it on a clean machine as root
nats-server:
	@PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v nats-server >/dev/null || { \
		command -v apt-get >/dev/null || { echo "nats-server missing and no apt-get: install it (https://nats.io)" >&2; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server; }

# Debian's chromium at /usr/bin/chromium: the web console's tests (tests/console) drive it headless
# through Playwright (a pip package; its own browser download, `playwright install`, is never used)
chromium:
	@test -x /usr/bin/chromium || { \
		command -v apt-get >/dev/null || { echo "/usr/bin/chromium missing and no apt-get: install Chromium" >&2; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

run: proto nats-server
	$(PY) -m broker $(ARGS)

cluster: proto nats-server
	$(PY) -m broker.cluster $(ARGS)

test: proto nats-server chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# after proto: mypy reads the generated stubs' .pyi files
lint: proto
	$(PY) -m ruff check broker client tests bench
	$(PY) -m mypy broker client bench

bench: proto
	$(PY) bench/run.py $(ARGS)

# peers for bench-compare (not part of CI): Debian's nats-server and clickhouse-server (18.16; only
# its binary is used, run by bench/run.py on a config of its own, not the system service) and npm's
# kinesalite; nats-py, the JetStream peer's client, is a runtime dependency (the `bench` extra is empty)
bench-peers: proto nats-server
	PATH="$$PATH:/usr/sbin" command -v clickhouse-server >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq clickhouse-server; }
	test -f bench/.peers/node_modules/kinesalite/cli.js || npm install --silent --prefix bench/.peers kinesalite

bench-compare: bench-peers
	$(PY) bench/run.py --compare $(ARGS)
	$(PY) bench/run.py timeplus --workloads t1 --clickhouse yes
	$(PY) bench/run.py tsdb --peers yes

bench-sources: proto nats-server
	$(PY) bench/run.py sources $(ARGS)

bench-memory: proto
	$(PY) bench/run.py memory $(ARGS)

bench-timeplus: proto
	$(PY) bench/run.py timeplus $(ARGS)

# bench/run.py tsdb's peers, part of bench-peers (not of CI): Debian's victoria-metrics and influxdb (1.x);
# only their binaries are used, each run by bench/tsdb.py on a temp dir and free loopback ports (never
# the packages' own services)
.PHONY: bench-tsdb tsdb-peers
bench-peers: tsdb-peers
tsdb-peers:
	command -v victoria-metrics >/dev/null || { apt-get update -qq && apt-get install -y -qq victoria-metrics; }
	PATH="$$PATH:/usr/sbin" command -v influxd >/dev/null || { apt-get update -qq && apt-get install -y -qq influxdb; }

bench-tsdb: proto
	$(PY) bench/run.py tsdb $(ARGS)

wheel: proto
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info client/_pb/sluice
