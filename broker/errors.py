"""The one error taxonomy of the broker.

Every error a client can see is a row of `ErrorCode`: HTTP status, gRPC status *name* (a string,
so the core never imports grpc), DIS error code, Timeplus (proton) error number and a message
template. The front doors read the
protocol columns in exactly one place each (`broker/api/render.py` for the HTTP doors,
`broker/api/grpc_render.py` for gRPC). Nothing in here imports from
the rest of the broker.

DIS codes and their meanings come from shared/spec/dis-api.md section 4. DIS answers HTTP 400 for
almost every client error (including "stream does not exist"), and we keep that: DIS clients key
on the DIS code, and the official SDK turns every 4xx into the same exception type anyway.
Statuses that DIS leaves unspecified are marked [ours].
"""
from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    #                        http  grpc status            DIS code  Timeplus  message template
    INVALID_REQUEST        = (400, "INVALID_ARGUMENT",    "DIS.4200",   36, "Invalid request. {detail}")
    INVALID_PARTITION_ID   = (400, "INVALID_ARGUMENT",    "DIS.4201",   36, "Invalid partition_id [{partition_id}]")
    EMPTY_REQUEST          = (400, "INVALID_ARGUMENT",    "DIS.4202",   36, "Empty request. {detail}")
    # The DIS monitoring API (show_stream_metrics / show_partition_metrics): DIS's own messages.
    INVALID_METRICS_PERIOD = (400, "INVALID_ARGUMENT",    "DIS.4203",   36, "Invalid monitoring period. {detail}")
    METRICS_PERIOD_TOO_LONG = (400, "OUT_OF_RANGE",       "DIS.4204",   36,
                               "The monitoring period cannot be longer than 7 days")
    INVALID_METRICS_LABEL  = (400, "INVALID_ARGUMENT",    "DIS.4209",   36, "Invalid metrics label. {detail}")
    # OpenTSDB's own message for a query of a metric no series has (Grafana and other clients show it)
    UNKNOWN_METRIC         = (400, "NOT_FOUND",           "DIS.4200",   36, "No such name for 'metrics': '{metric}'")
    INVALID_CURSOR_TYPE    = (400, "INVALID_ARGUMENT",    "DIS.4215",   36, "Invalid cursor type [{cursor_type}]")
    INVALID_SEQUENCE       = (400, "INVALID_ARGUMENT",    "DIS.4216",   36, "Invalid sequence_number [{value}]")
    INVALID_CURSOR         = (400, "INVALID_ARGUMENT",    "DIS.4217",   36, "Invalid partition cursor. {detail}")
    # The message format is DIS's own; the Java SDK parses given/earliest/latest out of it.
    SEQUENCE_OUT_OF_RANGE  = (400, "OUT_OF_RANGE",        "DIS.4224",   36,
                              "Sequence_number out of range. [{given}][ should be within ][{earliest}][ ][{latest}]")
    CURSOR_EXPIRED         = (400, "FAILED_PRECONDITION", "DIS.4225",   36,
                              "Partition cursor has expired, get a new cursor")
    CURSOR_RECORD_EXPIRED  = (400, "OUT_OF_RANGE",        "DIS.4226",   36,
                              "The record the cursor points at has expired [{seq}], the earliest retained is "
                              "[{earliest}]; get a new cursor")
    # An OpenTSDB put whose body holds no points to check (shared/spec/tsdb-put.md section 4):
    # OpenTSDB's own messages; what did not parse is the `details` the OpenTSDB door shows beside
    PUT_NO_CONTENT         = (400, "INVALID_ARGUMENT",    "DIS.4202",   36, "Missing request content")
    PUT_BAD_JSON           = (400, "INVALID_ARGUMENT",    "DIS.4300",  117, "Unable to parse the given JSON")
    PUT_NO_POINTS          = (400, "INVALID_ARGUMENT",    "DIS.4202",   36, "No datapoints found in content")
    BAD_BODY               = (400, "INVALID_ARGUMENT",    "DIS.4300",  117, "Request error. {detail}")
    TIMESTAMP_EXPIRED      = (400, "OUT_OF_RANGE",        "DIS.4300",   36,
                              "timestamp is expired, timestamp should be larger than {earliest}")
    STREAM_NOT_FOUND       = (400, "NOT_FOUND",           "DIS.4301",   60, "Stream [{stream}] does not exist")
    PARTITION_NOT_FOUND    = (400, "NOT_FOUND",           "DIS.4302",   36, "Partition [{partition_id}] does not exist")
    # [ours] DIS.4319 ("partition expired") for a write naming a partition a scale-down closed
    PARTITION_NOT_WRITABLE = (400, "FAILED_PRECONDITION", "DIS.4319",   36,
                              "Partition [{partition_id}] is DELETED by a scale-down: readable until retention, "
                              "not writable")
    STREAM_EXISTS          = (400, "ALREADY_EXISTS",      "DIS.4307",   57, "Stream [{stream}] already exists")
    QUOTA_EXCEEDED         = (400, "RESOURCE_EXHAUSTED",  "DIS.4308",   36, "Insufficient quota. {detail}")
    APP_QUOTA_EXCEEDED     = (400, "RESOURCE_EXHAUSTED",  "DIS.4329",   36, "Insufficient app quota. {detail}")
    APP_EXISTS             = (400, "ALREADY_EXISTS",      "DIS.4330",   36, "App [{app}] already exists")
    APP_NOT_FOUND          = (400, "NOT_FOUND",           "DIS.4332",   36, "App [{app}] does not exist")
    APP_NO_CHECKPOINT      = (400, "FAILED_PRECONDITION", "DIS.4375",   36,
                              "App [{app}] has not committed a checkpoint on stream [{stream}]")
    # Typed streams and queries (the Timeplus door first). Timeplus numbers are proton's own
    # (ClickHouse's) error codes for the same condition, so Timeplus users recognise them.
    BAD_ROW                = (400, "INVALID_ARGUMENT",    "DIS.4200",  117,
                              "Invalid row {row}, column [{column}]. {detail}")
    SQL_SYNTAX             = (400, "INVALID_ARGUMENT",    "DIS.4200",   62, "Syntax error in SQL. {detail}")
    UNKNOWN_COLUMN         = (400, "INVALID_ARGUMENT",    "DIS.4200",   47, "Unknown column [{column}]. {detail}")
    UNKNOWN_FUNCTION       = (400, "INVALID_ARGUMENT",    "DIS.4200",   46, "Unknown function [{function}]")
    TYPE_MISMATCH          = (400, "INVALID_ARGUMENT",    "DIS.4200",   53, "Type mismatch. {detail}")
    UNSUPPORTED_SQL        = (400, "UNIMPLEMENTED",       "DIS.4200",   48, "Not supported. {detail}")
    ILLEGAL_DIVISION       = (400, "INVALID_ARGUMENT",    "DIS.4200",  153, "Division by zero. {detail}")
    QUERY_NOT_FOUND        = (404, "NOT_FOUND",           "DIS.4200",   36, "Query [{query_id}] does not exist")
    TOO_MANY_QUERIES       = (429, "RESOURCE_EXHAUSTED",  "DIS.4200",  202, "Too many running queries. {detail}")
    # Sources (managed ingest jobs; the Timeplus door first). [ours] DIS has no sources: DIS.4200.
    BAD_SOURCE             = (400, "INVALID_ARGUMENT",    "DIS.4200",   36,
                              "Invalid source definition, property [{property}]. {detail}")
    SOURCE_NOT_FOUND       = (404, "NOT_FOUND",           "DIS.4200",   36, "Source [{source}] does not exist")
    SOURCE_EXISTS          = (409, "ALREADY_EXISTS",      "DIS.4200",   57, "Source [{source}] already exists")
    SOURCE_RUNNING         = (400, "FAILED_PRECONDITION", "DIS.4200",   36,
                              "Source [{source}] is running; stop it before updating it")
    # Authentication (shared/spec/dis-api.md section 7): DIS's own codes; [ours] HTTP 401 (the Java
    # SDK's auth status; real DIS says 441). Timeplus 516 is proton's AUTHENTICATION_FAILED. The
    # messages never say more than the code does (which of the AK or the signature was wrong).
    AUTH_BAD_SIGNATURE     = (401, "UNAUTHENTICATED",     "DIS.4100",  516, "Signature does not match")
    AUTH_MISSING           = (401, "UNAUTHENTICATED",     "DIS.4101",  516, "Authorization is missing. {detail}")
    AUTH_MALFORMED         = (401, "UNAUTHENTICATED",     "DIS.4102",  516, "Authorization cannot be parsed. {detail}")
    AUTH_DATE_MISSING      = (401, "UNAUTHENTICATED",     "DIS.4103",  516, "X-Sdk-Date is missing")
    AUTH_DATE_MALFORMED    = (401, "UNAUTHENTICATED",     "DIS.4104",  516,
                              "X-Sdk-Date cannot be parsed: it must be YYYYMMDDTHHMMSSZ (UTC)")
    AUTH_DATE_SKEW         = (401, "UNAUTHENTICATED",     "DIS.4105",  516,
                              "X-Sdk-Date is more than 15 minutes away from the server's time")
    AUTH_UNKNOWN_KEY       = (401, "UNAUTHENTICATED",     "DIS.4107",  516, "The access key or API key is invalid")
    AUTH_PROJECT_MISMATCH  = (401, "UNAUTHENTICATED",     "DIS.4117",  516, "Invalid project id. {detail}")
    # A valid key asking for what its role or its project does not allow (DIS's RBAC code);
    # Timeplus 497 is proton's ACCESS_DENIED.
    PERMISSION_DENIED      = (403, "PERMISSION_DENIED",   "DIS.4116",  497, "Operation not permitted. {detail}")
    # A request naming a host the port does not answer to (api/hosts.py: DNS rebinding); not an
    # authorization failure, so not counted with them (sluice_auth_failures_total).
    HOST_NOT_ALLOWED       = (403, "PERMISSION_DENIED",   "DIS.4116",  497, "Host not allowed. {detail}")
    # Throttling: a partition's write limit (per record, retriable: DIS.4303, "traffic control
    # limit exceeded") and one client's share of the broker (connections, requests, subscriptions:
    # the same DIS code, retriable too, in a 400 on the DIS door, see render.DisRenderer).
    THROTTLED              = (400, "RESOURCE_EXHAUSTED",  "DIS.4303",  202,
                              "Traffic control limit exceeded, retry later. {detail}")
    TOO_MANY_REQUESTS      = (429, "RESOURCE_EXHAUSTED",  "DIS.4303",  202, "Too many requests. {detail}")
    TOO_MANY_TAGS          = (400, "INVALID_ARGUMENT",    "DIS.4601",   36, "Too many tags. {detail}")
    # [ours] DIS's API gateway answers 413 for oversize bodies; the DIS code is our choice.
    REQUEST_TOO_LARGE      = (413, "RESOURCE_EXHAUSTED",  "DIS.4300",   36, "Request too large. {detail}")
    # [ours] unknown routes and methods; DIS has no code of its own for these.
    UNKNOWN_ROUTE          = (404, "UNIMPLEMENTED",       "DIS.4200",   36, "Unsupported operation [{method} {path}]")
    METHOD_NOT_ALLOWED     = (405, "UNIMPLEMENTED",       "DIS.4200",   36, "Method [{method}] not allowed on [{path}]")
    REQUEST_TIMEOUT        = (408, "DEADLINE_EXCEEDED",   "DIS.4200",  159, "Request body not received in time")
    # Server side. DIS.5250 is the code DIS clients retry per record; we use it for "try again".
    UNAVAILABLE            = (503, "UNAVAILABLE",         "DIS.5250", 1000,
                              "Service unavailable, retry later. {detail}")
    STORAGE_FULL           = (507, "RESOURCE_EXHAUSTED",  "DIS.5250",  243, "Storage is full, retry later")
    INTERNAL               = (500, "INTERNAL",            "DIS.5000", 1001, "System error (request id {request_id})")

    def __init__(self, http_status: int, grpc_status: str, dis_code: str, timeplus_code: int,
                 template: str) -> None:
        self.http_status = http_status
        self.grpc_status = grpc_status
        self.dis_code = dis_code
        self.timeplus_code = timeplus_code
        self.template = template

    @property
    def reason(self) -> str:
        """The row's unique, stable, machine-readable reason on every protocol (its name):
        rows may share a DIS code (STORAGE_FULL and UNAVAILABLE are both DIS.5250), never a reason."""
        return self.name


class BrokerError(Exception):
    """An error with a catalogue entry. `fields` fill the message template."""

    def __init__(self, code: ErrorCode, **fields: object) -> None:
        self.code = code
        self.fields = fields
        try:
            message = code.template.format(**{k: _short(v, DETAIL_CHARS if k == "detail" else ECHO_CHARS)
                                              for k, v in fields.items()})
        except (KeyError, IndexError):  # a missing field must not turn one error into another
            message = code.template
        message = message.replace(". {detail}", ".").strip() if "{detail}" in message else message
        self.message = _writable(message)
        super().__init__(self.message)

    @property
    def is_server_fault(self) -> bool:
        return self.code.http_status >= 500


# A value the client gave, echoed in a message (a stream's name in "Stream [...] does not exist"),
# is cut here: echoed whole, a 6,000-character name made the gRPC status trailers pass the
# client's metadata limit (8 KiB), which then saw RESOURCE_EXHAUSTED and no error details. A
# detail is ours, and quotes client text cut already; it is bounded all the same.
ECHO_CHARS = 256   # every name the broker takes is shorter: a partition key is at most 256
DETAIL_CHARS = 1000


def _writable(text: str) -> str:
    """`text` as every door can write it (UTF-8: JSON bodies, gRPC details). A header byte that is
    not UTF-8 reaches a message as aiohttp hands it over, a lone surrogate (surrogateescape), and
    orjson refused to write it: a bad Content-Type made the error body a 500. Such a byte is
    quoted as `\\xff`, any other lone surrogate as `\\udXXX`."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else
                       f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _short(value: object, limit: int) -> object:
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} characters)"
    return value


class ClientError(BrokerError):
    """The request was wrong; retrying it unchanged will fail again."""


class ServerError(BrokerError):
    """The broker could not do it now; the same request may succeed later."""


def client_error(code: ErrorCode, **fields: object) -> ClientError:
    return ClientError(code, **fields)


def server_error(code: ErrorCode, **fields: object) -> ServerError:
    return ServerError(code, **fields)
