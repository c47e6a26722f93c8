"""Consumer apps and their checkpoints, stored as opaque metadata in the Store.

Metadata key layout (under the store's metadata namespace; see storage/keys.py):

    b"A" + project + b"\\0" + app name                                JSON {"app_id", "created_ms"}
    b"C" + project + b"\\0" + app name + b"\\0" + stream_id u64 + part u32
                                                        JSON {"seq", "metadata", "stream", "app_id"}
    b"K"                                                          the cursor key (32 random bytes)

Other kinds in the same namespace: b"S" sources (sources/model.py), b"L" their leases on a shared
store (sources/manager.py), b"T" tsdb series types (tsdb/series.py), b"Z" the DIS monitoring series
(core/metric_series.py), b"G" consumer-group leases on a shared store and b"H" the horizons of one
broker's (core/leases.py).

Apps belong to a project, like streams. Checkpoints are keyed by the stream's id, not its name,
so a deleted-and-recreated stream never inherits the old stream's positions; delete_stream
removes them. Project and app names are [A-Za-z0-9_-], so the NUL separator cannot occur inside
one. The cursor key lives in the store, not beside it, so every broker of a shared store issues
cursors the others accept. Pure functions and values; core/consumers.py does the I/O.

A checkpoint carries the `app_id` of the app it was committed for (the app's incarnation: a new id
each time the name is created), and one of another id is read as absent (`checkpoint_of`). On a
shared store a commit through one broker can land after another broker's delete of the app has
scanned its checkpoints - one broker's lock orders only its own calls - and an app made again
under the name must not inherit it. Checkpoints stored before ids were have none and are read as
the app's that holds the name.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from broker.errors import ErrorCode, client_error

APP_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")   # DIS CreateApp rule
CHECKPOINT_TYPES = ("LAST_READ",)                # the only type DIS defines
MAX_METADATA_CHARS = 1000                        # DIS CommitCheckpoint limit

_PART = struct.Struct(">QI")


@dataclass(frozen=True, slots=True)
class AppInfo:
    name: str
    app_id: str
    created_ms: int
    stream_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    metadata: str


@dataclass(frozen=True, slots=True)
class PartitionConsumerState:
    partition: int
    checkpoint: Checkpoint | None
    earliest: int        # first retained seq
    latest: int          # newest seq (-1 when nothing was ever written)
    status: str = "ACTIVE"   # the partition's: ACTIVE, DELETED (a scale-down closed it), EXPIRED (past retention)

    @property
    def lag(self) -> int:
        """Records after the checkpoint (all retained records when there is none)."""
        done = self.checkpoint.seq if self.checkpoint else self.earliest - 1
        return max(0, self.latest - done)


def check_app_name(name: object) -> str:
    if not isinstance(name, str) or not APP_NAME.fullmatch(name):
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"app_name must be 1-200 characters of [A-Za-z0-9_-], got {name!r:.80}")
    return name


def check_checkpoint_type(kind: object) -> str:
    if kind not in CHECKPOINT_TYPES:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"checkpoint_type must be LAST_READ, got {kind!r:.40}")
    return "LAST_READ"


CURSOR_KEY = b"K"


APP_KIND = b"A"   # every app of every project starts with it


def app_prefix(project: str) -> bytes:
    return APP_KIND + project.encode() + b"\0"


def app_key(project: str, name: str) -> bytes:
    return app_prefix(project) + name.encode()


def app_name_of(key: bytes) -> str:
    return key[key.index(b"\0") + 1:].decode()


def encode_app(app_id: str, created_ms: int) -> bytes:
    return json.dumps({"app_id": app_id, "created_ms": created_ms}).encode()


def decode_app(name: str, raw: bytes, stream_names: tuple[str, ...] = ()) -> AppInfo:
    obj = json.loads(raw)
    return AppInfo(name, obj["app_id"], obj["created_ms"], stream_names)


CHECKPOINT_KIND = b"C"   # every checkpoint of every project starts with it


def checkpoint_project_prefix(project: str) -> bytes:
    """Every checkpoint of every app of `project` (names hold no NUL: the prefix is exact)."""
    return CHECKPOINT_KIND + project.encode() + b"\0"


def checkpoint_prefix(project: str, app: str) -> bytes:
    return checkpoint_project_prefix(project) + app.encode() + b"\0"


def checkpoint_key(project: str, app: str, stream_id: int, partition: int) -> bytes:
    return checkpoint_prefix(project, app) + _PART.pack(stream_id, partition)


def checkpoint_stream_prefix(project: str, app: str, stream_id: int) -> bytes:
    return checkpoint_prefix(project, app) + struct.pack(">Q", stream_id)


def checkpoint_ref(key: bytes) -> tuple[int, int]:
    """(stream_id, partition) of a checkpoint key."""
    stream_id, partition = _PART.unpack_from(key, len(key) - _PART.size)
    return stream_id, partition


def encode_checkpoint(seq: int, metadata: str, stream: str, app_id: str) -> bytes:
    return json.dumps({"seq": seq, "metadata": metadata, "stream": stream, "app_id": app_id}).encode()


def checkpoint_of(raw: bytes, app_id: str | None) -> Checkpoint | None:
    """The checkpoint, if it belongs to the app whose id is `app_id` (None: no such app now):
    one committed for another incarnation of the name is None."""
    obj = json.loads(raw)
    stored = obj.get("app_id")
    if app_id is None or (stored is not None and stored != app_id):
        return None
    return Checkpoint(obj["seq"], obj["metadata"])


def belongs(raw: bytes, app_id: str | None) -> bool:
    """Whether a stored checkpoint is the app's (see checkpoint_of)."""
    return checkpoint_of(raw, app_id) is not None
