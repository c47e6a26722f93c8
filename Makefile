# `make run`  : create .venv, install, generate stubs, start the broker (RocksDB under ./data)
# `make test` : create .venv, install with test deps, generate stubs, run the whole suite
# `make bench`: both benchmarks against fresh brokers: throughput (bench/put_records.py, takes
#               ARGS) then tail latency (bench/tail_latency.py, takes LATENCY_ARGS)
# `make bench-latency`: only the tail-latency benchmark (ARGS go to bench/tail_latency.py)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)
STUBS := client/_pb/sluice/v1/sluice_pb2.py
ARGS ?=
LATENCY_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install proto run test bench bench-latency wheel clean

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

run: proto
	$(PY) -m broker $(ARGS)

test: proto
	$(PY) -m pytest $(PYTEST_ARGS)

bench: proto
	$(PY) bench/put_records.py $(ARGS)
	$(PY) bench/tail_latency.py $(LATENCY_ARGS)

bench-latency: proto
	$(PY) bench/tail_latency.py $(ARGS)

wheel: proto
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info client/_pb/sluice
