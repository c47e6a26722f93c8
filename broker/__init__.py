"""Sluice broker. Where things live:

    __main__.py      `python -m broker`: settings -> app.serve(); signal handling
    settings.py      the one Settings dataclass; CLI flags + SLUICE_* environment variables
    app.py           composition root: store -> Broker -> gRPC + HTTP doors; graceful shutdown
    errors.py        the error catalogue: one row per error, a column per protocol
    model.py         plain values shared by core and storage
    core/            every rule: broker.py (the verbs), limits.py, routing.py, cursors.py,
                     writer.py (group commit)
    storage/         base.py (the Store protocol), keys.py (RocksDB key layout), rocks.py, memory.py
    api/             front doors: grpc_service.py, http_app.py + dis.py, render.py (errors -> wire)

Import direction: api -> core -> storage.base <- storage.rocks|memory; model and errors under all.
"""
