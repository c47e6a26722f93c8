"""A consumer-group member process for tests/e2e/test_consumer_group.py.

Runs a `GroupConsumer` and prints one JSON line per event to stdout, flushed at once:
    {"member": M, "partition": P, "seq": S, "id": ID}     a record handled (ID = the payload)
    {"member": M, "commit": P, "seq": S}                   a checkpoint committed (after the call returned)
    {"member": M, "assign": P, "t": T} / {"member": M, "release": P, "t": T}
                                                           T: time.monotonic() (one clock for every
                                                           process): after the grant / before the release
    {"member": M, "ready": true}                           heartbeating
SIGTERM stops it cleanly (workers commit, then LeaveGroup) and it exits 0.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from client import GroupConsumer, Record

_out = threading.Lock()


def emit(**fields: object) -> None:
    line = json.dumps(fields, separators=(",", ":"))
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


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
    args = parser.parse_args()
    member = args.member

    def handle(partition: int, records: list[Record]) -> None:
        with _out:
            for r in records:
                sys.stdout.write(json.dumps({"member": member, "partition": partition, "seq": r.seq,
                                             "id": int(r.data)}, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    group = GroupConsumer(args.target, args.app, args.stream, handle, member_id=member, lease_ms=args.lease_ms,
                          checkpoint_every=args.checkpoint_every, checkpoint_interval=args.checkpoint_interval,
                          mode=args.mode, batch=50,
                          on_assign=lambda p: emit(member=member, assign=p, t=time.monotonic()),
                          on_release=lambda p: emit(member=member, release=p, t=time.monotonic()),
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
