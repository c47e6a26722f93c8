"""Sluice Python client. Public API: the names in `__all__`; everything else is private.

* `Client`: thin synchronous wrapper over every RPC.
* `Producer` / `AsyncProducer`: batched, retrying writes (client/producer.py).
* `PartitionConsumer` / `AsyncPartitionConsumer`: read one partition in order, pull or push,
  resuming after an app's checkpoint (client/consumer.py).
* `GroupConsumer`: consumer-group member sharing a stream's partitions by leases (client/group.py).
"""
from client.client import Client, PutResult, Record, RecordsPage, Subscription
from client.consumer import AsyncPartitionConsumer, PartitionConsumer, StartPosition
from client.errors import BrokerUnavailable, SluiceError, StreamNotFound
from client.group import GroupConsumer
from client.producer import AsyncProducer, BufferFullError, Producer, ProducerStats

__all__ = ["Client", "PutResult", "Record", "RecordsPage", "Subscription", "SluiceError", "StreamNotFound",
           "BrokerUnavailable", "Producer", "AsyncProducer", "ProducerStats", "BufferFullError",
           "PartitionConsumer", "AsyncPartitionConsumer", "StartPosition", "GroupConsumer"]
