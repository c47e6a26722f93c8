"""Sluice broker. Where things live (tests/test_architecture.py fails when a module is missing here):

    __main__.py          `python -m broker`: settings -> app.serve(); signal handling
    settings.py          the one Settings dataclass; CLI flags + SLUICE_* environment variables
    app.py               composition root: store -> Broker -> gRPC + HTTP doors; graceful shutdown
    startup.py           startup errors an operator can fix, as one line (StartupError); the data-dir claim
    launcher.py          start a broker process and wait for its ready line (tests, benchmarks); free_port
    cluster.py           `sluice-cluster`/`make cluster`: a 3-node NATS JetStream cluster + two brokers on loopback
    tls.py               --tls-cert/--tls-key checked at startup; HTTPS sites and gRPC server credentials
    natsconn.py          opening and closing nats-py connections without leaving a socket behind
    malloc.py            memory knobs: glibc arenas capped, freed pages given back, the GC settled once started
    process.py           the process's open-files limit raised; accept failures logged at a bounded rate
    errors.py            the error catalogue: one row per error (its name is its reason), a column per protocol
    model.py             plain values shared by core and storage
    core/
      broker.py          Broker: the facade the doors call; composes the parts below
      catalogue.py       StreamCatalogue: streams per project; create, list, describe, delete, scale (layouts)
      writes.py          WritePath: PutRecords validation, routing, per-record outcomes
      writer.py          Committer: folds concurrent appends into one store append
      reads.py           ReadPath: cursors, GetRecords and long polls, push subscriptions
      consumers.py       Consumers: apps, checkpoints, consumer state (lag)
      groups.py          ConsumerGroups: heartbeats and leave, over the Leases interface
      leases.py          the lease rules (LeaseTable) and the Leases interface (LocalLeases; StoreLeases: a shared
                         store's one table, a key per group changed with meta_cas)
      apps.py            metadata key layout and values of apps, checkpoints and the cursor key
      retention.py       trimming expired records
      routing.py         partition choice: partition id, explicit hash key, key hash
      cursors.py         opaque, signed, expiring cursors
      notify.py          WriteNotifier: wake long polls and subscriptions on writes
      limits.py          limits and validation of names, pages and sequence numbers
      throttle.py        PartitionThrottle: write limits per partition (token buckets), THROTTLED for the excess
      queries.py         Queries: streaming SQL queries, one task each over the read path; bounded results
      stats.py           BrokerStats: plain counters and histograms of the work done (per batch, never per record)
      metric_series.py   MetricSeries: the DIS monitoring series, one durable row per stream and minute
    storage/
      __init__.py        the registry: open_store(settings) builds the store a setting names
      base.py            the async Store interface, its capabilities, its contract; StoreEvents (a shared
                         store reports other brokers' appends and stream changes)
      memory.py          MemoryStore: the reference model; ephemeral brokers
      rocks.py           RocksStore: the embedded default; runs the engine off the event loop
      rocks_engine.py    RocksEngine: the blocking RocksDB engine (the only rocksdict user)
      keys.py            RocksDB key and value layout, format version
      jetstream.py       JetStreamStore: the log (a JetStream stream per partition, a message per append
                         batch, numbered by expected-last-sequence) and metadata (a KV bucket) on NATS;
                         other brokers told of appends and stream changes over core NATS (watch)
    rows/                typed (Timeplus) rows: no I/O, used by the doors and queries
      types.py           column types: parse what users type into one canonical text (ColumnType)
      schema.py          build_schema (the create body -> StreamSchema), columns_of (with _tp_time)
      encode.py          RowEncoder: check and coerce rows column-wise -> one JSON object per record
      ingest.py          the four ingest formats: choose_format, decode(body) -> record data
    api/                 front doors: thin, decode -> one Broker call -> render
      http.py            shared HTTP plumbing: bodies, typed params, request ids, timeouts, the error middleware
      http_app.py        the HTTP application: mounts each door as a sub-app; parser errors as JSON
      coding.py          request bodies in a Content-Encoding (gzip, deflate) inflated whole, within the body cap
      limits.py          per-client limits (connections, requests, subscriptions per peer address), HTTP and gRPC
      hosts.py           the Host names the HTTP ports answer to (--allowed-hosts): DNS rebinding refused
      dis.py             the DIS v2 REST door
      tail.py            server-sent-events tail (push over HTTP)
      timeplus.py        the Timeplus v1beta2 REST door: typed streams, ingest, queries over SSE
      tsdb.py            the OpenTSDB/HiTSDB door: /api/put (flags, sync_timeout, exact bodies), query, suggest
      render.py          BrokerError -> DIS, Timeplus and OpenTSDB bodies, HTTP and gRPC statuses
      grpc_service.py    the gRPC door (sluice.v1): @rpc(Action) per RPC; project from the bearer key or sluice-project;
                         PutRecordsStream: batches pipelined into the write path, answered in order, window 8
      grpc_render.py     the gRPC door's renderer: status + google.rpc.Status/ErrorInfo trailer (and BatchError)
      metrics.py         Prometheus /metrics (a scrape-time collector over core/stats.py), /healthz, /readyz
      console.py         the web console at /console: its page's files and a thin JSON API (/console/api/...)
      console/           the page: index.html, style.css, ES modules (no build step, nothing from a CDN)
    sources/             managed ingest jobs (generator, websocket, NATS, JetStream) appending like any producer
      model.py           SourceDef (durable definition, in the store's metadata) and SourceState (live counters)
      props.py           reading and checking a definition's properties: BAD_SOURCE naming the property
      sink.py            messages -> rows of the target stream -> Broker.append_rows, durably, in batches
      base.py            SourceType, Job, JobContext, Backoff: what every source type provides and gets
      generator.py       stream_generator: template events on absolute deadlines
      websocket.py       websocket: a client of a WebSocket server, reconnecting with backoff
      nats.py            nats (core NATS) and nats_jetstream (pull consumer, ack after a durable append)
      registry.py        TYPES: every source type by name
      manager.py         Sources: create/list/get/update/delete/start/stop; supervised tasks; restart;
                         on a shared store a lease per source (meta_cas) so one broker runs it
    tsdb/                OpenTSDB/HiTSDB points over the log (the /api/put and /api/query door)
      series.py          series keys, their partition, the record layout, SeriesRegistry (one type per series,
                         durable), TsdbStream (the points' stream, created on first put, and its registry)
      points.py          checking and normalising put points: the spec's rules in order, its exact error strings
      put.py             writing checked points: sorted into partitions against the known types, new types
                         decided in array order and made durable, one append
      workers.py         --tsdb-workers: processes that parse, check and sort big put bodies (more cores)
      query.py           /api/query and /api/suggest: OpenTSDB 2.x queries read from the series' partitions, in Polars
    auth/                who may do what: credentials, roles, the DIS signature (no HTTP, no gRPC)
      credentials.py     the auth file (access keys, API keys -> Principal of a project and a role); Auth
      roles.py           Role, Action (one per verb of every door), permits(role, action)
      signing.py         the DIS SDK-HMAC-SHA256 verifier (spec section 7): a signed request -> Principal
    query/               the streaming SQL engine (Timeplus door): SQL -> QueryPlan -> Executor over Polars
      sqltext.py         Timeplus spellings sqlglot does not know (raw:key, 5s) rewritten before parsing
      dtypes.py          canonical column types -> kind and Polars dtype
      compile.py         sqlglot expressions -> typed Polars expressions (Timeplus semantics)
      plan.py            compile_query: parse, resolve stream/window/settings, type-check -> QueryPlan
      decode.py          records -> a frame of the needed columns (read_ndjson, bisecting fallback)
      exec.py            Executors: projection, windowed and global aggregation, bounded state

Import direction: api -> sources -> core -> storage.base <- storage.*; api -> tsdb -> core; api and
core -> rows, query (pure: typed rows and streaming SQL, no I/O); model and errors under all. The
core knows nothing of sources or tsdb: they are producers of it.
Vocabulary, one word per concept from the proto to the store: project, stream_name, partition_id
(partition: its index), seq (a sequence number), timestamp_ms, app_name; "group" means a consumer
group and nothing else.
"""
