"""`sluice-cluster` (`make cluster`): a local Sluice cluster in one command - a 3-node NATS JetStream
cluster and two brokers over it (`--store jetstream --replicas 3`), all on loopback, each with its own
ports, store dir and data dir under --dir (default ./cluster-data). Prints the addresses, and stops
everything on Ctrl-C or SIGTERM (brokers first, then the NATS nodes).

    nats-server n1 ─┐ routes (RAFT) ┌─ broker a (gRPC, HTTP)
    nats-server n2 ─┼───────────────┤
    nats-server n3 ─┘               └─ broker b (gRPC, HTTP)

The same classes (NatsNode, NatsCluster, SluiceCluster) are the tests' harness (tests/cluster/) and
the R=3 benchmark's (bench/run.py cluster). Readiness is never a sleep: a NATS node is up when its
client port accepts, the JetStream cluster when every node's monitoring endpoint (/jsz) names the
same meta leader, a broker when it printed its ready line (broker/launcher.py).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from broker.launcher import BrokerProcess, free_port

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
CLUSTER_NAME = "sluice"
LOG_LINES_KEPT = 2000   # a broker's log lines kept in memory (the rest is in its log file)


def nats_server_exe() -> str:
    exe = shutil.which("nats-server", path=SEARCH_PATH)
    if not exe:
        raise RuntimeError("nats-server is not installed (`make nats-server`: apt-get install nats-server)")
    return exe


class Stopped(RuntimeError):
    """A wait given up because a stop was asked for (sluice-cluster's signal handler)."""


def _check(stopping: threading.Event | None) -> None:
    if stopping is not None and stopping.is_set():
        raise Stopped("stop asked for")


@dataclass
class NatsNode:
    """One nats-server of the cluster: `-c <dir>/<name>.conf`; stop()/kill()/start() keep ports and store."""

    name: str
    dir: Path
    port: int
    cluster_port: int
    http_port: int
    routes: list[int] = field(default_factory=list)   # the other nodes' cluster ports
    proc: subprocess.Popen[bytes] | None = None
    hold: int | None = None   # sluice-cluster's lock on its --dir (hold_dir), which the node keeps too

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return self.dir / self.name

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def config(self) -> Path:
        conf = self.dir / f"{self.name}.conf"
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
        conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            "max_payload: 8MB\n"                      # a PutRecords of up to 5 MB to one partition is one message
            f"jetstream {{ store_dir: {json.dumps(str(self.store))} }}\n"
            f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}\n")
        return conf

    def start(self, timeout: float = 20.0, stopping: threading.Event | None = None) -> NatsNode:
        """Return once this process is up: still running and its monitoring port answers with this
        node's server_name (a port another process holds accepts connections too: that is not it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([nats_server_exe(), "-c", str(self.config())], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         pass_fds=() if self.hold is None else (self.hold,))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-2000:])
            if self.server_name() == self.name:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    if self.proc.poll() is None:
                        return self
                    continue   # it exited meanwhile: reported above
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} not up on {self.port} (monitoring {self.http_port}) "
                                   f"after {timeout}s; log {self.log}")
            _check(stopping)
            time.sleep(0.05)

    def server_name(self) -> str | None:
        """The server_name the node's monitoring port (/varz) gives, or None (no answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/varz", timeout=1) as resp:
                doc = json.load(resp)
        except (OSError, ValueError):
            return None
        name = doc.get("server_name") if isinstance(doc, dict) else None
        return str(name) if name is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (lame duck is not needed on loopback) and wait."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def jsz(self) -> dict[str, object]:
        """The node's JetStream monitoring document (/jsz)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=2) as resp:
            doc: dict[str, object] = json.load(resp)
            return doc

    def meta_leader(self) -> str | None:
        try:
            meta = self.jsz().get("meta_cluster")
        except OSError:
            return None
        return str(meta.get("leader") or "") or None if isinstance(meta, dict) else None


class NatsCluster:
    """`size` nats-servers routed to each other on loopback, JetStream on, store dirs under `dir`."""

    def __init__(self, dir_: Path, size: int = 3, ports: Sequence[int] | None = None) -> None:
        """ports: the client ports (cluster and monitoring ports are client + 2000 and + 4000); free ones if None."""
        self.dir = dir_
        self.stopping: threading.Event | None = None   # set: the waits below give up (Stopped)
        if ports is None:
            clients, routes, https = ([free_port() for _ in range(size)] for _ in range(3))
        else:
            clients = list(ports)
            routes, https = [p + 2000 for p in clients], [p + 4000 for p in clients]
        self.nodes = [NatsNode(f"n{i + 1}", dir_, clients[i], routes[i], https[i],
                               [r for j, r in enumerate(routes) if j != i]) for i in range(len(clients))]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def servers(self) -> str:
        """The --nats-servers value: every node."""
        return ",".join(self.urls)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start the nodes not running; return once the cluster has its meta leader and every stream a
        leader (a restarted cluster elects them again: until then their requests time out). If that
        fails, the nodes it started are stopped again: none is left running behind the error."""
        started: list[NatsNode] = []
        try:
            for node in self.nodes:
                if not node.running:
                    started.append(node)
                    node.start(stopping=self.stopping)
            self.wait_for_leader(timeout)
            self.wait_for_stream_leaders(timeout)
        except BaseException:
            for node in started:
                with contextlib.suppress(Exception):   # the others still go; the error raised is the start's
                    node.stop()
            raise
        return self

    def wait_for_leader(self, timeout: float = 60.0) -> str:
        """Until every running node names the same running node as the JetStream meta leader: its name.
        (After a node dies the others name it for a few seconds more, until they elect another.)"""
        deadline = time.monotonic() + timeout
        while True:
            running = {n.name for n in self.nodes if n.running}
            leaders = {n.meta_leader() for n in self.nodes if n.running}
            if len(leaders) == 1 and leaders <= running:
                (leader,) = leaders
                assert leader is not None
                return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"no JetStream meta leader after {timeout}s (nodes say {leaders}); "
                                   f"logs in {self.dir}")
            _check(self.stopping)
            time.sleep(0.1)

    def leaderless_streams(self) -> set[str]:
        """Streams some running node holds whose RAFT group has no running leader (by /jsz)."""
        running = {n.name for n in self.nodes if n.running}
        out: set[str] = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/jsz?accounts=true&streams=true",
                                            timeout=2) as resp:
                    doc = json.load(resp)
            except OSError:
                out.add(f"? ({node.name} does not answer)")
                continue
            for account in doc.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if (stream.get("cluster") or {}).get("leader") not in running:
                        out.add(str(stream.get("name")))
        return out

    def wait_for_stream_leaders(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while missing := self.leaderless_streams():
            if time.monotonic() > deadline:
                raise RuntimeError(f"streams without a leader after {timeout}s: {sorted(missing)[:10]}; "
                                   f"logs in {self.dir}")
            _check(self.stopping)
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class ClusterBroker(BrokerProcess):
    """A BrokerProcess whose log goes to a file as well (a long-running cluster keeps only the tail in memory)."""

    def __init__(self, name: str, log: Path | None, data_dir: Path, *args: str) -> None:
        super().__init__(data_dir, *args)
        self.name, self.log_path = name, log

    def _drain_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        out = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        try:
            for line in self.proc.stderr:
                if out:
                    out.write(line)
                    out.flush()
                self.stderr_lines.append(line)
                if len(self.stderr_lines) > LOG_LINES_KEPT:
                    del self.stderr_lines[:LOG_LINES_KEPT // 2]
        finally:
            if out:
                out.close()


class SluiceCluster:
    """A NatsCluster and `brokers` brokers on it (`--store jetstream --replicas R`), data dirs under `dir`."""

    def __init__(self, dir_: Path, *, nodes: int = 3, brokers: int = 2, replicas: int = 3, prefix: str = "sluice",
                 nats_ports: Sequence[int] | None = None, broker_ports: Sequence[tuple[int, int]] | None = None,
                 broker_args: Sequence[str] = (), log_files: bool = True) -> None:
        self.dir = dir_
        self.nats = NatsCluster(dir_ / "nats", nodes, nats_ports)
        self.replicas, self.prefix, self.broker_args, self.log_files = replicas, prefix, tuple(broker_args), log_files
        ports = list(broker_ports) if broker_ports else [(0, 0)] * brokers
        self.brokers = [self.new_broker(chr(ord("a") + i), grpc, http) for i, (grpc, http) in enumerate(ports)]

    def new_broker(self, name: str, grpc_port: int = 0, http_port: int = 0) -> ClusterBroker:
        """A broker of this cluster, not started (data dir <dir>/broker-<name>); start it with start_broker."""
        return ClusterBroker(name, self.dir / f"broker-{name}.log" if self.log_files else None,
                             self.dir / f"broker-{name}",
                             "--store", "jetstream", "--nats-servers", self.nats.servers,
                             "--replicas", str(self.replicas), "--nats-prefix", self.prefix,
                             "--grpc-port", str(grpc_port), "--http-port", str(http_port), *self.broker_args)

    def start(self) -> SluiceCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nats.start()
        for broker in self.brokers:
            self.start_broker(broker)
        return self

    def start_broker(self, broker: ClusterBroker) -> ClusterBroker:
        """(Re)start one broker on the ports it had (its first start: the ones asked for, or free ones)."""
        if broker.grpc_port:   # a restart: keep the addresses clients know
            fresh = self.new_broker(broker.name, broker.grpc_port, broker.http_port)
            broker.extra_args = fresh.extra_args
        broker.stderr_lines = []
        broker.start(60)
        return broker

    @property
    def grpc_targets(self) -> list[str]:
        return [b.grpc_target for b in self.brokers]

    @property
    def failover_target(self) -> str:
        """One gRPC target naming every broker (`ipv4:h:p,h:p`): gRPC's pick_first connects to the first
        that answers and moves to the next when it goes away - a client's failover, with no client code."""
        return "ipv4:" + ",".join(self.grpc_targets)

    def stop(self) -> None:
        for broker in self.brokers:
            if broker.proc is not None and broker.proc.poll() is None:
                try:
                    broker.stop(20)
                except subprocess.TimeoutExpired:
                    broker.kill()
        self.nats.stop()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sluice-cluster", description="A local Sluice cluster: a 3-node NATS JetStream cluster and two brokers "
        "(--store jetstream --replicas 3) on loopback. Ctrl-C stops everything.")
    parser.add_argument("--dir", default="cluster-data", help="where the NATS store dirs, the brokers' data dirs "
                        "and every log go (default ./cluster-data; kept between runs: a restart finds the data)")
    parser.add_argument("--nats-port", type=int, default=4222, help="client port of the first NATS node; the others "
                        "follow (default 4222: 4222-4224; cluster routes +2000, monitoring +4000); 0 = free ports")
    parser.add_argument("--grpc-port", type=int, default=50051,
                        help="gRPC port of the first broker; the second gets the next (default 50051); 0 = free ports")
    parser.add_argument("--http-port", type=int, default=8080,
                        help="HTTP port of the first broker; the second gets the next (default 8080); 0 = free ports")
    parser.add_argument("--brokers", type=int, default=2, choices=range(1, 10), metavar="N",
                        help="brokers to start (default 2)")
    parser.add_argument("--nodes", type=int, default=3, choices=(3, 5),
                        help="NATS nodes (default 3; for one node, run nats-server -js as the README shows)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="--replicas of the brokers (default: the number of nodes)")
    parser.add_argument("--nats-prefix", default="sluice", help="the brokers' --nats-prefix (default sluice)")
    parser.add_argument("broker_args", nargs="*", help="more broker options, after `--` (e.g. -- --fsync)")
    args = parser.parse_args(argv)
    if args.replicas is None:
        args.replicas = args.nodes
    if not 1 <= args.replicas <= args.nodes:
        parser.error(f"--replicas must be within 1..{args.nodes} (the NATS nodes)")
    return args


LOCK_FILE = ".sluice-cluster.lock"


def hold_dir(dir_: Path) -> int:
    """Lock `dir_` for one sluice-cluster: an flock on <dir>/.sluice-cluster.lock, whose descriptor
    the NATS nodes and brokers inherit, so the lock lasts while any of them runs - a sluice-cluster
    killed with SIGKILL leaves them running, and a second one on the same --dir would start another
    nats-server on each JetStream store dir (nats-server does not refuse it). Returns the
    descriptor; raises RuntimeError naming the processes that hold it (their pids, as written)."""
    dir_.mkdir(parents=True, exist_ok=True)
    path = dir_ / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holders = " ".join(path.read_text().split()) or "?"
        raise RuntimeError(f"{dir_} is in use by another sluice-cluster or by the processes of one that was "
                           f"killed (pids {holders}); stop them first") from None
    note_holders(fd, [os.getpid()])
    return fd


def note_holders(fd: int, pids: Sequence[int]) -> None:
    """The pids a refused hold_dir names."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, " ".join(map(str, pids)).encode() + b"\n", 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        nats_server_exe()
    except RuntimeError as exc:
        print(f"sluice-cluster: error: {exc}", file=sys.stderr)
        return 1
    nats_ports = None if args.nats_port == 0 else [args.nats_port + i for i in range(args.nodes)]
    broker_ports = [(args.grpc_port + i if args.grpc_port else 0, args.http_port + i if args.http_port else 0)
                    for i in range(args.brokers)]
    cluster = SluiceCluster(Path(args.dir).resolve(), nodes=args.nodes, brokers=args.brokers,
                            replicas=args.replicas, prefix=args.nats_prefix, nats_ports=nats_ports,
                            broker_ports=broker_ports, broker_args=args.broker_args)
    try:
        hold = hold_dir(cluster.dir)
    except RuntimeError as exc:
        print(f"sluice-cluster: error: {exc}", file=sys.stderr)
        return 1
    for node in cluster.nats.nodes:
        node.hold = hold
    for broker in cluster.brokers:   # they outlive a SIGKILL too
        broker.pass_fds = (hold,)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    cluster.nats.stopping = stopping
    try:
        print(f"sluice-cluster: starting {args.nodes} NATS nodes and {args.brokers} brokers under {cluster.dir}",
              flush=True)
        cluster.nats.start()
        leader = cluster.nats.wait_for_leader()
        for node in cluster.nats.nodes:
            print(f"  nats {node.name}: {node.url}  (monitoring http://127.0.0.1:{node.http_port}, "
                  f"store {node.store}, log {node.log})" + ("  [meta leader]" if node.name == leader else ""))
        for broker in cluster.brokers:
            if stopping.is_set():
                break
            cluster.start_broker(broker)
            print(f"  broker {broker.name}: grpc={broker.grpc_target} http={broker.http_url}  "
                  f"(data {broker.data_dir}, log {broker.log_path})", flush=True)
        note_holders(hold, [os.getpid(), *(n.proc.pid for n in cluster.nats.nodes if n.proc is not None),
                            *(b.proc.pid for b in cluster.brokers if b.proc is not None)])
        if not stopping.is_set():
            print(f"sluice cluster ready: --nats-servers {cluster.nats.servers}; failover gRPC target "
                  f"{cluster.failover_target}; Ctrl-C stops everything", flush=True)
        told: set[str] = set()
        while not stopping.wait(0.5):
            for proc, name in [(b.proc, f"broker {b.name}") for b in cluster.brokers] + \
                              [(n.proc, f"nats {n.name}") for n in cluster.nats.nodes]:
                if proc is not None and proc.poll() is not None and name not in told:
                    told.add(name)
                    print(f"sluice-cluster: {name} exited with status {proc.returncode} (see its log); "
                          "the others go on", file=sys.stderr, flush=True)
    except Stopped:
        pass
    except RuntimeError as exc:
        print(f"sluice-cluster: error: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    except BaseException:   # anything else: still no nats-server or broker left behind
        cluster.stop()
        raise
    print("sluice-cluster: stopping", flush=True)
    cluster.stop()
    print("sluice-cluster: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
