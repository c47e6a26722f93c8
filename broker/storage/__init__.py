"""Storage behind one small interface (`base.Store`). `STORES` maps a setting to an implementation,
imported lazily so only the chosen backend loads."""

STORES = {
    "rocksdb": "broker.storage.rocks:RocksStore",
    "memory": "broker.storage.memory:MemoryStore",
}
