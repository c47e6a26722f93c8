"""Every limit the broker enforces, in one table, each with its reason.

Numbers come from shared/spec/dis-api.md section 5 unless marked [ours].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import ErrorCode, client_error

STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")   # DIS create-stream rule
# [ours] DIS project ids are 32 hex characters, Timeplus workspaces short alphanumerics: one rule
# that takes both and keeps a project name safe inside store keys (no NUL, no separators).
PROJECT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
HASH_KEY_MAX = 2**63 - 1                           # DIS hash space is unsigned 63-bit (Java Long.MAX_VALUE)
SEQUENCE_MAX = 2**63 - 1                           # DIS sequence numbers: 0 .. 2^63-1


@dataclass(frozen=True)
class Limits:
    # A record's payload, before base64: DIS allows 1 MB.
    max_record_bytes: int = 1024 * 1024
    # Records in one PutRecords. DIS documents no server cap; its clients send up to 1000 (Java)
    # or partitions x 1000 (old Python SDK). [ours] 10,000 bounds the work of one request while
    # admitting every client batch we know of.
    max_records_per_put: int = 10_000
    # Payload bytes in one PutRecords: DIS ADVANCED streams take 5 MB per request (Kinesis: 5 MiB).
    # [ours] we apply the ADVANCED figure to every stream rather than throttle COMMON ones to 1 MB.
    max_put_payload_bytes: int = 5 * 1024 * 1024
    # HTTP body size: Huawei's API gateway rejects bodies over 12 MB with 413. Base64 inflates the
    # 5 MB payload cap to ~6.7 MB, so this never bites a valid request first.
    max_http_body_bytes: int = 12 * 1024 * 1024
    # partition_key length: undocumented in DIS; Kinesis allows 256.
    max_partition_key_chars: int = 256
    # Partitions per stream: DIS's default account quota is 50 COMMON partitions; [ours] a single
    # stream may use up to 256 before we answer DIS.4308.
    max_partitions: int = 256
    # Partitions of a project, every stream's readable ones (DELETED included, until retention):
    # DIS's default account quota is 60; [ours] 100,000 bounds what one tenant's streams cost the
    # broker (each is a series of /metrics and a look each retention pass) without DIS's ticket.
    max_project_partitions: int = 100_000
    # Scale events a stream keeps (those within its retention window: each holds a boundary per
    # partition, and readers work through them). DIS allows 5 an hour (120 in a day); Sluice
    # relaxes the rate but bounds the history: past this, UpdatePartitionCount is QUOTA_EXCEEDED
    # until the oldest event leaves the retention window.
    max_scale_events: int = 200
    # Retention: DIS accepts 24..72 hours, default 24.
    min_retention_hours: int = 24
    max_retention_hours: int = 72
    default_retention_hours: int = 24
    # GetRecords: Kinesis returns at most 10,000 records per call; DIS clients send limit 1000.
    default_read_limit: int = 1000
    max_read_limit: int = 10_000
    # max_fetch_bytes default: the SDK sends 1 MiB; [ours] cap a single read at 10 MiB (Kinesis).
    default_fetch_bytes: int = 1024 * 1024
    max_fetch_bytes: int = 10 * 1024 * 1024
    # Cursors are valid 5 minutes (DIS and Kinesis).
    cursor_ttl_ms: int = 5 * 60 * 1000
    # Long-poll GetRecords / push batching: [ours] at most 20 s of waiting per call, well inside the
    # official SDK's 120 s read timeout (and our client's 30 s), so a waiting poll never looks dead.
    max_wait_ms: int = 20_000
    # Push subscriptions send an empty message after this much silence so a dead consumer is noticed
    # and proxies keep the connection open. app.py sets it from --subscribe-heartbeat.
    subscribe_heartbeat_ms: int = 15_000
    # Apps: DIS's default app quota is undocumented; [ours] 1000 per project.
    max_apps: int = 1000
    # Consumer-group lease: [ours] 1..300 s, default 10 s; members heartbeat every lease/3.
    min_lease_ms: int = 1_000
    max_lease_ms: int = 300_000
    default_lease_ms: int = 10_000
    # Page sizes: ListStreams 1..100 (default 10); DescribeStream partitions 1..1000 (default 100).
    default_list_limit: int = 10
    max_list_limit: int = 100
    default_partition_page: int = 100
    max_partition_page: int = 1000
    # ListApp 1..100 (default 10); ShowConsumerState 1..1000 (default 100).
    default_app_page: int = 10
    max_app_page: int = 100
    # Write throughput per partition (core/throttle.py), 0 = off: DIS ADVANCED allows 2,000
    # records/s and 5 MB/s, Kinesis 1,000 and 1 MiB/s. [ours] ten times DIS's records and 20 MiB/s:
    # enough for what one partition of this broker sustains, a guard against one hot partition.
    # app.py sets both from --partition-records-per-s / --partition-bytes-per-s.
    partition_records_per_s: int = 20_000
    partition_bytes_per_s: int = 20 * 1024 * 1024


DEFAULT_LIMITS = Limits()


def clip_page(value: int | None, default: int, maximum: int, name: str) -> int:
    """A page size: None means default; outside 1..maximum is a client error (DIS rejects it)."""
    if value is None:
        return default
    if not 1 <= value <= maximum:
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be within [1, {maximum}], got {value}")
    return value


def check_stream_name(name: object) -> str:
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"stream_name must be 1-64 characters of [A-Za-z0-9_-], got {name!r:.80}")
    return name


MAX_TAGS = 10                 # a resource's tags (DIS: 10)
TAG_KEY_CHARS, TAG_VALUE_CHARS = 36, 43
SYS_TAG_KEY = "_sys_enterprise_project_id"   # the one system tag DIS knows; its value is a UUID
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)


def check_tags(raw: object, name: str = "tags") -> tuple[tuple[str, str], ...]:
    """A stream's tags as given, `[{"key", "value"}, ...]` (None: none), checked as DIS checks
    them: keys of 1-36 and values of 0-43 printable characters, no key twice, at most 10
    (TOO_MANY_TAGS); `sys_tags` hold only `_sys_enterprise_project_id` with a UUID. Raises
    INVALID_REQUEST."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name} must be a list of {{key, value}} objects")
    if len(raw) > MAX_TAGS:
        raise client_error(ErrorCode.TOO_MANY_TAGS, detail=f"at most {MAX_TAGS} {name}, got {len(raw)}")
    tags: dict[str, str] = {}
    for i, tag in enumerate(raw):
        key, value = (tag.get("key"), tag.get("value", "")) if isinstance(tag, dict) else (None, None)
        value = "" if value is None else value
        if not isinstance(key, str) or not 1 <= len(key) <= TAG_KEY_CHARS or not key.isprintable():
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name}[{i}]: key must be 1-{TAG_KEY_CHARS} "
                                                                 f"printable characters, got {key!r:.60}")
        if not isinstance(value, str) or len(value) > TAG_VALUE_CHARS or not value.isprintable():
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name}[{i}]: value must be 0-{TAG_VALUE_CHARS} "
                                                                 f"printable characters, got {value!r:.60}")
        if name == "sys_tags" and (key != SYS_TAG_KEY or not _UUID.fullmatch(value)):
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"sys_tags[{i}]: the key must be {SYS_TAG_KEY} "
                                                                 "and the value a UUID")
        if key in tags:
            raise client_error(ErrorCode.INVALID_REQUEST, detail=f"{name}[{i}]: key [{key}] is given twice")
        tags[key] = value
    return tuple(tags.items())


def check_project(project: object) -> str:
    if not isinstance(project, str) or not PROJECT_NAME.fullmatch(project):
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"project must be 1-64 characters of [A-Za-z0-9_-], got {project!r:.80}")
    return project


# [ours] a stream's description, ttl_expression and column defaults; a query's name, description
# and each tag: each is kept in a store value or in memory, so bounded (a 10 MB description was a
# 503 on a JetStream store; a thousand ended queries of 10 MB labels, 10 GB of memory)
MAX_TEXT_CHARS = 1024


def check_text(what: str, value: object) -> str:
    """A short text setting: a string of at most MAX_TEXT_CHARS. Raises INVALID_REQUEST naming it."""
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"{what} must be a string of at most {MAX_TEXT_CHARS} characters")
    return value


def parse_seq(value: object) -> int:
    """A sequence number as a door hands it over: an int, or a decimal string of ASCII digits
    (leading zeros allowed, as Java's Long.parseLong takes them). Raises INVALID_SEQUENCE for
    anything else, including values past SEQUENCE_MAX - checked on the digits' length first, so a
    5,000-digit string never reaches int() (whose digit limit raises)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= SEQUENCE_MAX:
            return value
    elif isinstance(value, str) and value and value.isascii() and value.isdigit():
        digits = value.lstrip("0")
        seq = int(digits or "0") if len(digits) <= 19 else SEQUENCE_MAX + 1
        if seq <= SEQUENCE_MAX:
            return seq
    raise client_error(ErrorCode.INVALID_SEQUENCE, value="missing" if value is None else f"{value!s:.40}")
