"""A consumer-group member process for tests/e2e/test_consumer_group.py.

Runs a `GroupConsumer` and prints one JSON line per event to stdout, flushed at once:
    {"member": M, "partition": P, "seq": S, "id": ID}     a record handled (ID = the payload)
    {"member": M, "commit": P, "seq": S}                   a checkpoint committed (after the call returned)
    {"member": M, "assign": P} / {"member": M, "release": P}
    {"member": M, "ready": true}                           heartbeating
SIGTERM stops it cleanly (workers commit, then LeaveGroup) and it exits 0.
`--heartbeat-target`: heartbeats and LeaveGroup go to that broker, reads and checkpoints to
`--target` (members of one group on different brokers of a shared store, their data on one).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, Iterable

from client import Client, GroupConsumer, Record
from client.model import Assignment

_out = threading.Lock()


def emit(**fields: object) -> None:
    line = json.dumps(fields, separators=(",", ":"))
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class SplitClient(Client):
    """Group membership through another broker's client; everything else through this one."""

    def __init__(self, target: str, groups: Client) -> None:
        super().__init__(target)
        self.groups = groups

    def heartbeat(self, app_name: str, stream_name: str, member_id: str, held: Iterable[int] = (),
                  lease_ms: int = 0) -> Assignment:
        return self.groups.with_timeout(self._timeout).heartbeat(app_name, stream_name, member_id, held, lease_ms)

    def leave_group(self, app_name: str, stream_name: str, member_id: str) -> None:
        self.groups.with_timeout(self._timeout).leave_group(app_name, stream_name, member_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--app", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--member", required=True)
    parser.add_argument("--lease-ms", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--checkpoint-interval", type=float, default=0.2)
    parser.add_argument("--mode", default="pull")
    parser.add_argument("--heartbeat-target")
    args = parser.parse_args()
    member = args.member

    def handle(partition: int, records: list[Record]) -> None:
        with _out:
            for r in records:
                sys.stdout.write(json.dumps({"member": member, "partition": partition, "seq": r.seq,
                                             "id": int(r.data)}, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    target: Any = SplitClient(args.target, Client(args.heartbeat_target)) if args.heartbeat_target else args.target
    group = GroupConsumer(target, args.app, args.stream, handle, member_id=member, lease_ms=args.lease_ms,
                          checkpoint_every=args.checkpoint_every, checkpoint_interval=args.checkpoint_interval,
                          mode=args.mode, batch=50,
                          on_assign=lambda p: emit(member=member, assign=p),
                          on_release=lambda p: emit(member=member, release=p),
                          on_commit=lambda p, s: emit(member=member, commit=p, seq=s))

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    group.start()
    emit(member=member, ready=True)
    try:
        group.join()
    finally:
        group.stop()


if __name__ == "__main__":
    main()
