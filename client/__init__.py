"""Sluice Python client. Public API: `Client` and the errors below; everything else is private."""
from client.client import Client, PutResult, Record, RecordsPage
from client.errors import BrokerUnavailable, SluiceError, StreamNotFound

__all__ = ["Client", "PutResult", "Record", "RecordsPage", "SluiceError", "StreamNotFound", "BrokerUnavailable"]
