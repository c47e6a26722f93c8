"""Sources: background jobs of the broker that read from somewhere and append rows to a stream
(shared/spec/sources.md).

    model.py      SourceDef (durable, in the store's metadata) and SourceState (live counters)
    props.py      reading and checking a definition's properties (BAD_SOURCE naming the property)
    sink.py       messages -> rows of the target stream -> Broker.append_rows, durably, in batches
    base.py       SourceType, Job, JobContext, Backoff: what every type provides and gets
    generator.py  stream_generator: random events from a template at an interval
    websocket.py  websocket: a WebSocket client, reconnecting with backoff
    nats.py       nats (core NATS) and nats_jetstream (durable pull consumer, ack after append)
    registry.py   TYPES: every type by name
    manager.py    Sources: create/list/get/update/delete/start/stop, supervised tasks, restart
"""
