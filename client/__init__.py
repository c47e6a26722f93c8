"""Sluice Python client. Public API: the names in `__all__`; everything else is private.

* `Client` / `AsyncClient`: thin wrappers over every RPC (sync, and asyncio on grpc.aio) - streams,
  records, apps, checkpoints, groups and the broker's sources. Both take `project=` (default
  $SLUICE_PROJECT, else "default"), `api_key=` (a broker with an auth file; the key's workspace is
  then the project) and `tls_ca=` (a broker with TLS: the CA's PEM file or bytes), and return the
  dataclasses of client/model.py, never protobuf messages.
* `Producer` / `AsyncProducer`: batched, retrying writes (client/producer.py).
* `PartitionConsumer` / `AsyncPartitionConsumer`: read one partition in order, pull or push,
  resuming after an app's checkpoint (client/consumer.py).
* `GroupConsumer`: consumer-group member sharing a stream's partitions by leases (client/group.py).
* Errors (client/errors.py): `SluiceError` and its subclasses, chosen by the broker's reason
  (`SluiceError.reason`, e.g. STREAM_NOT_FOUND) through one table, `ERRORS`.
"""
from client.aio import AsyncClient, AsyncSubscription
from client.client import Client, Subscription
from client.consumer import AsyncPartitionConsumer, PartitionConsumer, StartPosition
from client.errors import (
    ERRORS,
    AlreadyExists,
    BrokerUnavailable,
    CursorInvalid,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PositionGone,
    SluiceError,
    StreamNotFound,
    Throttled,
    Unauthenticated,
    is_retriable,
)
from client.group import GroupConsumer
from client.model import (
    AppInfo,
    AppPage,
    Assignment,
    Checkpoint,
    PartitionConsumerState,
    PartitionInfo,
    PutResult,
    Record,
    RecordsPage,
    ScaleEvent,
    Segment,
    SourceError,
    SourceInfo,
    SourceStats,
    SourceThroughput,
    StreamDescription,
    StreamInfo,
    StreamPage,
)
from client.producer import AsyncProducer, BufferFullError, Producer, ProducerStats

__all__ = ["Client", "AsyncClient", "Subscription", "AsyncSubscription",
           "PutResult", "Record", "RecordsPage", "StreamInfo", "StreamPage", "PartitionInfo", "StreamDescription",
           "ScaleEvent", "Segment",
           "AppInfo", "AppPage", "Checkpoint", "PartitionConsumerState", "Assignment",
           "SourceInfo", "SourceStats", "SourceError", "SourceThroughput",
           "SluiceError", "NotFound", "StreamNotFound", "AlreadyExists", "InvalidRequest", "CursorInvalid",
           "PositionGone", "BrokerUnavailable", "Unauthenticated", "PermissionDenied", "Throttled",
           "ERRORS", "is_retriable",
           "Producer", "AsyncProducer", "ProducerStats", "BufferFullError",
           "PartitionConsumer", "AsyncPartitionConsumer", "StartPosition", "GroupConsumer"]
