"""Consumer apps, their checkpoints and consumer state (lag), per project.

The key layout and the values are in core/apps.py; this module does the I/O through the store's
metadata calls.
"""
from __future__ import annotations

import asyncio
import bisect
import uuid
from typing import Callable

from broker.core import apps
from broker.core.apps import AppInfo, Checkpoint, PartitionConsumerState
from broker.core.catalogue import StreamCatalogue
from broker.core.limits import Limits, check_project, clip_page, parse_seq
from broker.errors import ErrorCode, client_error
from broker.model import StreamConfig
from broker.storage.base import Store


class Consumers:
    def __init__(self, catalogue: StreamCatalogue, store: Store, limits: Limits, clock_ms: Callable[[], int]) -> None:
        self._catalogue = catalogue
        self._store = store
        self._limits = limits
        self._now = clock_ms
        self._lock = asyncio.Lock()   # orders app creation and deletion

    async def app(self, project: str, app_name: object) -> str:
        """The name of an existing app. Raises INVALID_REQUEST, APP_NOT_FOUND."""
        project = check_project(project)
        name = apps.check_app_name(app_name)
        if await self._store.meta_get(apps.app_key(project, name)) is None:
            raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
        return name

    async def create_app(self, project: str, app_name: object) -> AppInfo:
        """Raises INVALID_REQUEST, APP_EXISTS, APP_QUOTA_EXCEEDED."""
        project = check_project(project)
        name = apps.check_app_name(app_name)
        async with self._lock:
            existing = await self._store.meta_scan(apps.app_prefix(project))
            if any(k == apps.app_key(project, name) for k, _ in existing):
                raise client_error(ErrorCode.APP_EXISTS, app=name)
            if len(existing) >= self._limits.max_apps:
                raise client_error(ErrorCode.APP_QUOTA_EXCEEDED, detail=f"at most {self._limits.max_apps} apps")
            info = AppInfo(name, uuid.uuid4().hex, self._now())
            # create-if-absent: the lock orders this broker's creations, the compare-and-set those of
            # every broker on a shared store (two at once both found it absent in the scan above)
            if not await self._store.meta_cas(apps.app_key(project, name), None,
                                              apps.encode_app(info.app_id, info.created_ms)):
                raise client_error(ErrorCode.APP_EXISTS, app=name)
        return info

    async def _app_streams(self, project: str, name: str) -> tuple[str, ...]:
        keys = await self._store.meta_scan(apps.checkpoint_prefix(project, name))
        return self._stream_names({apps.checkpoint_ref(k)[0] for k, _ in keys})

    def _stream_names(self, stream_ids: set[int]) -> tuple[str, ...]:
        """The names of those streams still known, sorted."""
        configs = (self._catalogue.by_id(i) for i in stream_ids)
        return tuple(sorted(c.stream_name for c in configs if c is not None))

    async def _streams_by_app(self, project: str) -> dict[str, tuple[str, ...]]:
        """_app_streams of every app of the project, from one scan of its checkpoints (a scan per
        app made a list of 1,000 apps cost ~1 s, and the console lists them every 2 s)."""
        prefix = apps.checkpoint_project_prefix(project)
        ids: dict[str, set[int]] = {}
        for key, _ in await self._store.meta_scan(prefix):
            app = key[len(prefix):key.index(b"\0", len(prefix))].decode()
            ids.setdefault(app, set()).add(apps.checkpoint_ref(key)[0])
        return {app: self._stream_names(sids) for app, sids in ids.items()}

    async def describe_app(self, project: str, app_name: object) -> AppInfo:
        """Raises INVALID_REQUEST, APP_NOT_FOUND."""
        project = check_project(project)
        name = apps.check_app_name(app_name)
        raw = await self._store.meta_get(apps.app_key(project, name))
        if raw is None:
            raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
        return apps.decode_app(name, raw, await self._app_streams(project, name))

    async def list_apps(self, project: str, limit: int | None = None, start_after: str | None = None,
                        stream_name: str | None = None) -> tuple[int, list[AppInfo], bool]:
        """(total, page, has_more) in name order; with `stream_name`, only apps that committed a
        checkpoint on that stream. Raises INVALID_REQUEST, STREAM_NOT_FOUND."""
        project = check_project(project)
        limit = clip_page(limit, self._limits.default_app_page, self._limits.max_app_page, "limit")
        rows = await self._store.meta_scan(apps.app_prefix(project))
        streams = await self._streams_by_app(project)
        infos = []
        for key, value in rows:
            name = apps.app_name_of(key)
            infos.append(apps.decode_app(name, value, streams.get(name, ())))
        if stream_name:
            self._catalogue.get(project, stream_name)
            infos = [i for i in infos if stream_name in i.stream_names]
        start = bisect.bisect_right([i.name for i in infos], start_after) if start_after else 0
        return len(infos), infos[start:start + limit], start + limit < len(infos)

    async def delete_app(self, project: str, app_name: object) -> str:
        """Delete an app and all its checkpoints; its name. Raises INVALID_REQUEST, APP_NOT_FOUND."""
        async with self._lock:
            name = await self.app(project, app_name)
            # the app key last: a store that applies the changes one by one (JetStream's KV) and
            # stops in the middle leaves the app with fewer checkpoints, never checkpoints without it
            doomed: dict[bytes, bytes | None] = {
                key: None for key, _ in await self._store.meta_scan(apps.checkpoint_prefix(project, name))}
            doomed[apps.app_key(project, name)] = None
            await self._store.meta_write(doomed)
        return name

    async def forget_stream(self, config: StreamConfig) -> None:
        """Drop every app's checkpoints of a deleted stream, so they do not linger: one scan of
        the project's checkpoints (a scan per app made a delete cost ~0.1 s with 1,000 apps)."""
        doomed: dict[bytes, bytes | None] = {
            key: None for key, _ in await self._store.meta_scan(apps.checkpoint_project_prefix(config.project))
            if apps.checkpoint_ref(key)[0] == config.stream_id}
        if doomed:
            await self._store.meta_write(doomed)

    async def _target(self, project: str, app_name: object, stream_name: object,
                      checkpoint_type: object) -> tuple[str, StreamConfig]:
        apps.check_checkpoint_type(checkpoint_type)
        name = await self.app(project, app_name)
        return name, self._catalogue.get(project, stream_name)

    async def commit_checkpoint(self, project: str, app_name: object, stream_name: object, partition_id: object,
                                seq: object, metadata: object = None, checkpoint_type: object = "LAST_READ") -> None:
        """Record that the app has processed the partition up to and including `seq`.
        Raises APP_NOT_FOUND, STREAM_NOT_FOUND, INVALID_PARTITION_ID, PARTITION_NOT_FOUND,
        INVALID_SEQUENCE, SEQUENCE_OUT_OF_RANGE, INVALID_REQUEST."""
        name, config = await self._target(project, app_name, stream_name, checkpoint_type)
        p = self._catalogue.partition_of(config, partition_id)
        if metadata is not None and (not isinstance(metadata, str) or len(metadata) > apps.MAX_METADATA_CHARS):
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"metadata must be a string of at most {apps.MAX_METADATA_CHARS} characters")
        value = parse_seq(seq)
        bounds = await self._store.bounds(config.stream_id, p)
        if not max(bounds.first_seq - 1, 0) <= value <= bounds.last_seq:
            raise client_error(ErrorCode.SEQUENCE_OUT_OF_RANGE, given=value, earliest=bounds.first_seq,
                               latest=bounds.last_seq)   # below earliest when no record is held: an empty range
        async with self._lock:   # ordered against delete_app: never a checkpoint of a deleted app
            await self.app(project, name)
            await self._store.meta_write({apps.checkpoint_key(project, name, config.stream_id, p):
                                          apps.encode_checkpoint(value, metadata or "", config.stream_name)})

    async def get_checkpoint(self, project: str, app_name: object, stream_name: object, partition_id: object,
                             checkpoint_type: object = "LAST_READ") -> Checkpoint | None:
        """The committed checkpoint, or None. Raises APP_NOT_FOUND, STREAM_NOT_FOUND,
        INVALID_PARTITION_ID, PARTITION_NOT_FOUND, INVALID_REQUEST."""
        name, config = await self._target(project, app_name, stream_name, checkpoint_type)
        p = self._catalogue.partition_of(config, partition_id)
        raw = await self._store.meta_get(apps.checkpoint_key(project, name, config.stream_id, p))
        return apps.decode_checkpoint(raw) if raw is not None else None

    async def delete_checkpoint(self, project: str, app_name: object, stream_name: object,
                                partition_id: object = None, checkpoint_type: object = "LAST_READ") -> None:
        """Delete one partition's checkpoint, or every partition's when `partition_id` is None."""
        name, config = await self._target(project, app_name, stream_name, checkpoint_type)
        if partition_id is None:
            rows = await self._store.meta_scan(apps.checkpoint_stream_prefix(project, name, config.stream_id))
            doomed: dict[bytes, bytes | None] = {k: None for k, _ in rows}
        else:
            p = self._catalogue.partition_of(config, partition_id)
            doomed = {apps.checkpoint_key(project, name, config.stream_id, p): None}
        if doomed:
            await self._store.meta_write(doomed)

    async def lag_snapshot(self, max_series: int) -> tuple[list[tuple[str, str, str, int, int]], int]:
        """Every checkpoint's lag, for metrics: (project, app, stream name, partition, records after
        the checkpoint), at most `max_series` of them (in key order), and how many were left out.
        Checkpoints of deleted streams are skipped."""
        out: list[tuple[str, str, str, int, int]] = []
        left_out = 0
        for key, raw in await self._store.meta_scan(apps.CHECKPOINT_KIND):
            sid, p = apps.checkpoint_ref(key)
            config = self._catalogue.by_id(sid)
            if config is None or p >= config.readable_partition_count:
                continue
            if len(out) >= max_series:
                left_out += 1
                continue
            project, app = key[1:-12].split(b"\0")[:2]
            b = await self._store.bounds(sid, p)
            state = PartitionConsumerState(p, apps.decode_checkpoint(raw), b.first_seq, b.last_seq)
            out.append((project.decode(), app.decode(), config.stream_name, p, state.lag))
        return out, left_out

    async def consumer_state(self, project: str, app_name: object, stream_name: object,
                             checkpoint_type: object = "LAST_READ", start_after_partition: object = None,
                             limit: int | None = None) -> tuple[list[PartitionConsumerState], bool]:
        """Per partition: checkpoint vs. retained range (lag). Raises APP_NOT_FOUND,
        STREAM_NOT_FOUND, APP_NO_CHECKPOINT, INVALID_PARTITION_ID, INVALID_REQUEST."""
        name, config = await self._target(project, app_name, stream_name, checkpoint_type)
        limit = clip_page(limit, self._limits.default_partition_page, self._limits.max_partition_page, "limit")
        start = self._catalogue.page_start(config, start_after_partition)
        chosen = range(start, min(start + limit, config.readable_partition_count))
        sid = config.stream_id
        marks = {apps.checkpoint_ref(k)[1]: apps.decode_checkpoint(v)
                 for k, v in await self._store.meta_scan(apps.checkpoint_stream_prefix(project, name, sid))}
        if not marks:
            raise client_error(ErrorCode.APP_NO_CHECKPOINT, app=name, stream=config.stream_name)
        out = []
        for p in chosen:
            b = await self._store.bounds(sid, p)
            out.append(PartitionConsumerState(p, marks.get(p), b.first_seq, b.last_seq,
                                              self._catalogue.partition_status(config, p)))
        return out, chosen.stop < config.readable_partition_count
