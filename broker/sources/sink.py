"""Messages -> rows of the target stream -> one append through the core, as ingest does.

`Sink.write(payloads)` maps a batch of messages by the source's `data_type` (shared/spec/sources.md
section 1) and appends the rows with `Broker.append_rows`, the path every producer takes; it
returns once the append is durable (the store's durability), so a job may acknowledge its origin
then. A message that cannot be a row (not a JSON object, a value of the wrong type, not UTF-8) is
counted in `SourceState.errors`, logged and skipped: the rest of the batch is written. An append
that fails (the stream was deleted, the store is full or closing) raises the BrokerError: nothing
of that batch may be acknowledged, and the job backs off and retries. An append over the stream's
write limit (THROTTLED) is sent again after a short wait instead: the source slows to the limit.

Typed streams: `json` messages are rows by column name (like ingest `format=streaming`: missing
columns take their defaults, unknown keys are ignored); `text` messages fill the string column
`raw`. A stream without a schema (made by the DIS door) takes a `json` message that is an object
as the record's data as it was sent (surrounding whitespace cut), and a `text` message's bytes as
they are.

The batch is encoded as a whole (the column-wise encoder is fast); only when that refuses is each
message encoded alone, to find the bad ones.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import orjson

from broker.core.broker import Broker
from broker.errors import ClientError, ErrorCode, client_error
from broker.model import StreamConfig
from broker.rows.encode import RowEncoder
from broker.sources.model import SourceState

DATA_TYPES = ("json", "text")
THROTTLED_WAIT_S = 0.05   # a throttled batch is sent again this much later


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


class Sink:
    def __init__(self, broker: Broker, project: str, stream: str, data_type: str, state: SourceState) -> None:
        self.broker, self.project, self.stream, self.data_type = broker, project, stream, data_type
        self.state = state
        self._encoder: RowEncoder | None = None
        self._stream_id = -1
        # the last write's append completed (its rows are durable), even if the write was cancelled
        # meanwhile and raised CancelledError: a job that acknowledges its origin still may
        self.landed = False

    async def target(self) -> StreamConfig:
        """The target stream now; STREAM_NOT_FOUND when it is gone (the job fails and retries). On a
        shared store, one created through another broker is found there (its event may be late)."""
        return await self.broker.stream_config(self.stream, project=self.project)

    def _encoder_for(self, config: StreamConfig) -> RowEncoder:
        if self._encoder is None or self._stream_id != config.stream_id:
            self._encoder, self._stream_id = RowEncoder(config.schema), config.stream_id
        return self._encoder

    async def write(self, payloads: Sequence[bytes | str]) -> int:
        """Map and append one batch of raw messages; returns the rows written."""
        self.landed = False
        self.state.messages_in += len(payloads)
        if self.data_type == "json":
            objects: list[dict] = []
            sent: list[bytes | str] = []   # each object's message as it came: a plain log stores that
            for p in payloads:
                try:
                    value = orjson.loads(p)
                except orjson.JSONDecodeError as e:
                    self.state.error(f"a message is not JSON ({e}); skipped")
                    continue
                if type(value) is not dict:
                    self.state.error(f"a message is {_kind(value)}, not a JSON object; skipped")
                    continue
                objects.append(value)
                sent.append(p)
            return await self._append_objects(objects, sent)
        config = await self.target()
        if config.schema is None:   # a plain log: a text message's bytes as they are, UTF-8 or not
            return await self._append(config, [p if isinstance(p, bytes) else p.encode(errors="surrogatepass")
                                               for p in payloads])
        texts: list[str] = []
        for p in payloads:
            if isinstance(p, bytes):
                try:
                    p = p.decode()
                except UnicodeDecodeError:
                    self.state.error("a message is not valid UTF-8 text; skipped")
                    continue
            texts.append(p)
        return await self._append_texts(texts)

    async def write_objects(self, objects: list[dict]) -> int:
        """Append rows given as objects (the generator); counted as messages in."""
        self.state.messages_in += len(objects)
        return await self._append_objects(objects)

    async def _append_objects(self, objects: list[dict], sent: list[bytes | str] | None = None) -> int:
        """`sent`: each object's message as received. A plain log stores it as it is: orjson's
        re-encoding of what it read turns an integer past 64 bits into a float and cuts a decimal's
        digits (1.00000000000000000001 -> 1.0), so the record would not be what was sent."""
        if not objects:
            return 0
        config = await self.target()
        now_ms = time.time_ns() // 1_000_000
        if config.schema is None:   # a plain log: the object itself is the record
            return await self._append(config, [orjson.dumps(o) for o in objects] if sent is None else
                                      [(p if isinstance(p, bytes) else p.encode()).strip() for p in sent])
        encoder = self._encoder_for(config)
        try:
            rows = encoder.objects(objects, now_ms)
        except ClientError:
            rows = self._one_by_one(lambda o: encoder.objects([o], now_ms), objects)
        return await self._append(config, rows)

    async def _append_texts(self, texts: list[str]) -> int:
        if not texts:
            return 0
        config = await self.target()
        now_ms = time.time_ns() // 1_000_000
        encoder = self._encoder_for(config)
        if not encoder.takes_text:   # the stream was recreated without `raw`: a failure, not bad messages
            check_target(config, "text")
        try:
            rows = encoder.texts(texts, now_ms)
        except ClientError:
            rows = self._one_by_one(lambda t: encoder.texts([t], now_ms), texts)
        return await self._append(config, rows)

    def _one_by_one(self, encode: Any, items: list) -> list[bytes]:
        rows: list[bytes] = []
        for item in items:
            try:
                rows += encode(item)
            except ClientError as e:
                self.state.error(f"a message does not fit stream [{self.stream}]: {e.message}; skipped")
        return rows

    async def _append(self, config: StreamConfig, rows: list[bytes]) -> int:
        if not rows:
            return 0
        limit = self.broker.limits.max_record_bytes
        if max(map(len, rows)) > limit:
            kept = [r for r in rows if len(r) <= limit]
            for _ in range(len(rows) - len(kept)):
                self.state.error(f"a message is over the record limit of {limit} bytes; skipped")
            rows = kept
            if not rows:
                return 0
        # The append runs to its end even if the job is cancelled meanwhile (stop, delete, shutdown):
        # the committer would finish it anyway, and this way the rows are counted and a stop returns
        # only after them. (The manager's wait for a cancelled job is bounded.)
        while True:
            append = asyncio.ensure_future(self.broker.append_rows(self.stream, rows, project=self.project,
                                                                   stream_id=config.stream_id))
            try:
                await asyncio.shield(append)
            except asyncio.CancelledError:
                await asyncio.wait({append})
                if not append.cancelled() and append.exception() is None:
                    self.state.wrote(len(rows))
                    self.landed = True
                raise
            except ClientError as e:
                # Over the stream's write limit: wait and send the batch again (nothing of it went
                # in). A source is paced by its target's limit, back-pressuring its origin, rather
                # than failing and reconnecting.
                if e.code is not ErrorCode.THROTTLED:
                    raise
                await asyncio.sleep(THROTTLED_WAIT_S)
                continue
            self.state.wrote(len(rows))
            self.landed = True
            return len(rows)


def check_target(config: StreamConfig, data_type: str) -> None:
    """A `text` source needs a string column `raw` (or a stream without a schema): refused at
    create time rather than failing every message later."""
    if data_type == "text" and config.schema is not None:
        if not RowEncoder(config.schema).takes_text:
            raise client_error(ErrorCode.BAD_SOURCE, property="data_type",
                               detail=f"text messages go to a string column named raw, and stream "
                                      f"[{config.stream_name}] has none")
