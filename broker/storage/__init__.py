"""Storage behind one interface (`base.Store`). `open_store` builds the store a Settings names
through the registry below - each backend's factory knows its own options - imported lazily, so
only the chosen backend (and its native library) loads. No other module branches on the backend."""
from __future__ import annotations

import importlib

from broker.settings import Settings
from broker.storage.base import Store

# setting value -> "module:Class"; the class has `async from_settings(settings) -> Store`
STORES = {
    "rocksdb": "broker.storage.rocks:RocksStore",
    "memory": "broker.storage.memory:MemoryStore",
    "jetstream": "broker.storage.jetstream:JetStreamStore",
}


async def open_store(settings: Settings) -> Store:
    module, _, name = STORES[settings.store].partition(":")
    store_cls = getattr(importlib.import_module(module), name)
    store: Store = await store_cls.from_settings(settings)
    return store
