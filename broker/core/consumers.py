"""Consumer apps, their checkpoints and consumer state (lag), per project.

The key layout and the values are in core/apps.py; this module does the I/O through the store's
metadata calls.
"""
from __future__ import annotations

import asyncio
import bisect
import uuid
from dataclasses import replace
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
        self._lock = asyncio.Lock()   # orders this broker's app creation, deletion and commits
        self._shared = store.capabilities.shared

    async def app(self, project: str, app_name: object) -> str:
        """The name of an existing app. Raises INVALID_REQUEST, APP_NOT_FOUND."""
        return (await self.incarnation(project, app_name))[0]

    async def incarnation(self, project: str, app_name: object) -> tuple[str, str]:
        """(name, app_id) of an existing app: the id tells it from an app deleted and made again
        under its name (its checkpoints and group leases are that app's only). Raises
        INVALID_REQUEST, APP_NOT_FOUND."""
        project = check_project(project)
        name = apps.check_app_name(app_name)
        app_id = await self._app_id(project, name)
        if app_id is None:
            raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
        return name, app_id

    async def _app_id(self, project: str, name: str) -> str | None:
        raw = await self._store.meta_get(apps.app_key(project, name))
        return None if raw is None else apps.decode_app(name, raw).app_id

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

    async def _app_streams(self, project: str, name: str, app_id: str) -> tuple[str, ...]:
        rows = await self._store.meta_scan(apps.checkpoint_prefix(project, name))
        return self._stream_names({apps.checkpoint_ref(k)[0] for k, v in rows if apps.belongs(v, app_id)})

    def _stream_names(self, stream_ids: set[int]) -> tuple[str, ...]:
        """The names of those streams still known, sorted."""
        configs = (self._catalogue.by_id(i) for i in stream_ids)
        return tuple(sorted(c.stream_name for c in configs if c is not None))

    async def _streams_by_app(self, project: str, app_ids: dict[str, str]) -> dict[str, tuple[str, ...]]:
        """_app_streams of every app of the project (`app_ids`: name -> app_id), from one scan of
        its checkpoints (a scan per app made a list of 1,000 apps cost ~1 s, and the console lists
        them every 2 s)."""
        prefix = apps.checkpoint_project_prefix(project)
        ids: dict[str, set[int]] = {}
        for key, value in await self._store.meta_scan(prefix):
            app = key[len(prefix):key.index(b"\0", len(prefix))].decode()
            if apps.belongs(value, app_ids.get(app)):
                ids.setdefault(app, set()).add(apps.checkpoint_ref(key)[0])
        return {app: self._stream_names(sids) for app, sids in ids.items()}

    async def describe_app(self, project: str, app_name: object) -> AppInfo:
        """Raises INVALID_REQUEST, APP_NOT_FOUND."""
        project = check_project(project)
        name = apps.check_app_name(app_name)
        raw = await self._store.meta_get(apps.app_key(project, name))
        if raw is None:
            raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
        info = apps.decode_app(name, raw)
        return replace(info, stream_names=await self._app_streams(project, name, info.app_id))

    async def list_apps(self, project: str, limit: int | None = None, start_after: str | None = None,
                        stream_name: str | None = None) -> tuple[int, list[AppInfo], bool]:
        """(total, page, has_more) in name order; with `stream_name`, only apps that committed a
        checkpoint on that stream. Raises INVALID_REQUEST, STREAM_NOT_FOUND."""
        project = check_project(project)
        limit = clip_page(limit, self._limits.default_app_page, self._limits.max_app_page, "limit")
        rows = await self._store.meta_scan(apps.app_prefix(project))
        infos = [apps.decode_app(apps.app_name_of(key), value) for key, value in rows]
        streams = await self._streams_by_app(project, {i.name: i.app_id for i in infos})
        infos = [replace(i, stream_names=streams.get(i.name, ())) for i in infos]
        if stream_name:
            self._catalogue.get(project, stream_name)
            infos = [i for i in infos if stream_name in i.stream_names]
        start = bisect.bisect_right([i.name for i in infos], start_after) if start_after else 0
        return len(infos), infos[start:start + limit], start + limit < len(infos)

    async def delete_app(self, project: str, app_name: object) -> tuple[str, str]:
        """Delete an app and all its checkpoints; its (name, app_id). Raises INVALID_REQUEST,
        APP_NOT_FOUND."""
        project = check_project(project)
        name = apps.check_app_name(app_name)
        key = apps.app_key(project, name)
        async with self._lock:
            raw = await self._store.meta_get(key)
            if raw is None:
                raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
            app_id = apps.decode_app(name, raw).app_id
            # the app key last: a store that applies the changes one by one (JetStream's KV) and
            # stops in the middle leaves the app with fewer checkpoints, never checkpoints without it
            doomed = await self._checkpoints_of(project, name, app_id)
            if doomed:
                await self._store.meta_write(dict.fromkeys(doomed))
            # this incarnation only: on a shared store another broker may have deleted it and made
            # the name again meanwhile (the new app's checkpoints carry its own id: left alone)
            if not await self._store.meta_cas(key, raw, None):
                raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
        if self._shared:
            # A commit through another broker that found the app before it went may have written
            # after the scan above (its lock is not ours). It is read as absent by an app made again
            # under the name (another app_id); taken away here, or by that commit itself once it
            # sees the app gone (commit_checkpoint), so it does not linger.
            for stray, value in (await self._checkpoints_of(project, name, app_id)).items():
                await self._store.meta_cas(stray, value, None)
        return name, app_id

    async def _checkpoints_of(self, project: str, name: str, app_id: str) -> dict[bytes, bytes]:
        """The stored checkpoints (key -> value) of the app of that name and id."""
        return {k: v for k, v in await self._store.meta_scan(apps.checkpoint_prefix(project, name))
                if apps.belongs(v, app_id)}

    async def forget_stream(self, config: StreamConfig) -> None:
        """Drop every app's checkpoints of a deleted stream, so they do not linger: one scan of
        the project's checkpoints (a scan per app made a delete cost ~0.1 s with 1,000 apps)."""
        doomed: dict[bytes, bytes | None] = {
            key: None for key, _ in await self._store.meta_scan(apps.checkpoint_project_prefix(config.project))
            if apps.checkpoint_ref(key)[0] == config.stream_id}
        if doomed:
            await self._store.meta_write(doomed)

    async def _target(self, project: str, app_name: object, stream_name: object,
                      checkpoint_type: object) -> tuple[str, str, StreamConfig]:
        """(app name, app_id, stream)."""
        apps.check_checkpoint_type(checkpoint_type)
        name, app_id = await self.incarnation(project, app_name)
        return name, app_id, self._catalogue.get(project, stream_name)

    async def commit_checkpoint(self, project: str, app_name: object, stream_name: object, partition_id: object,
                                seq: object, metadata: object = None, checkpoint_type: object = "LAST_READ") -> None:
        """Record that the app has processed the partition up to and including `seq`.
        Raises APP_NOT_FOUND, STREAM_NOT_FOUND, INVALID_PARTITION_ID, PARTITION_NOT_FOUND,
        INVALID_SEQUENCE, SEQUENCE_OUT_OF_RANGE, INVALID_REQUEST."""
        name, app_id, config = await self._target(project, app_name, stream_name, checkpoint_type)
        p = self._catalogue.partition_of(config, partition_id)
        if metadata is not None and (not isinstance(metadata, str) or len(metadata) > apps.MAX_METADATA_CHARS):
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"metadata must be a string of at most {apps.MAX_METADATA_CHARS} characters")
        value = parse_seq(seq)
        bounds = await self._store.bounds(config.stream_id, p)
        if value > bounds.last_seq and self._shared:
            # past this broker's cached head: another broker may have acknowledged the record a
            # moment ago (its notification still on the way), so the store is asked before a refusal
            bounds = await self._store.fresh_bounds(config.stream_id, p)
        if not max(bounds.first_seq - 1, 0) <= value <= bounds.last_seq:
            raise client_error(ErrorCode.SEQUENCE_OUT_OF_RANGE, given=value, earliest=bounds.first_seq,
                               latest=bounds.last_seq)   # below earliest when no record is held: an empty range
        key = apps.checkpoint_key(project, name, config.stream_id, p)
        raw = apps.encode_checkpoint(value, metadata or "", config.stream_name, app_id)
        async with self._lock:   # ordered against this broker's delete_app: never a checkpoint of a deleted app
            if await self._app_id(project, name) != app_id:   # gone, maybe made again, meanwhile
                raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
            await self._store.meta_write({key: raw})
        if self._shared and await self._app_id(project, name) != app_id:
            # deleted through another broker meanwhile (maybe made again: another id). The checkpoint
            # is that app's, read by no other; taken away unless overwritten since, and the commit
            # refused as it would have been a moment later.
            await self._store.meta_cas(key, raw, None)
            raise client_error(ErrorCode.APP_NOT_FOUND, app=name)

    async def get_checkpoint(self, project: str, app_name: object, stream_name: object, partition_id: object,
                             checkpoint_type: object = "LAST_READ") -> Checkpoint | None:
        """The committed checkpoint, or None. Raises APP_NOT_FOUND, STREAM_NOT_FOUND,
        INVALID_PARTITION_ID, PARTITION_NOT_FOUND, INVALID_REQUEST."""
        name, app_id, config = await self._target(project, app_name, stream_name, checkpoint_type)
        p = self._catalogue.partition_of(config, partition_id)
        raw = await self._store.meta_get(apps.checkpoint_key(project, name, config.stream_id, p))
        return apps.checkpoint_of(raw, app_id) if raw is not None else None

    async def delete_checkpoint(self, project: str, app_name: object, stream_name: object,
                                partition_id: object = None, checkpoint_type: object = "LAST_READ") -> None:
        """Delete one partition's checkpoint, or every partition's when `partition_id` is None."""
        name, _, config = await self._target(project, app_name, stream_name, checkpoint_type)
        if partition_id is None:
            rows = await self._store.meta_scan(apps.checkpoint_stream_prefix(project, name, config.stream_id))
            doomed: dict[bytes, bytes | None] = {k: None for k, _ in rows}
        else:
            p = self._catalogue.partition_of(config, partition_id)
            doomed = {apps.checkpoint_key(project, name, config.stream_id, p): None}
        if doomed:
            await self._store.meta_write(doomed)

    async def lag_snapshot(self, max_series: int, project: str | None = None,
                           ) -> tuple[list[tuple[str, str, str, int, int]], int]:
        """Every checkpoint's lag, for metrics: (project, app, stream name, partition, records after
        the checkpoint), at most `max_series` of them (in key order), and how many were left out.
        With `project`, that project's checkpoints only (a key's scrape: other projects' neither
        take its series' places nor count as left out). Checkpoints of deleted streams are skipped."""
        out: list[tuple[str, str, str, int, int]] = []
        left_out = 0
        app_scan = apps.APP_KIND if project is None else apps.app_prefix(project)
        checkpoint_scan = apps.CHECKPOINT_KIND if project is None else apps.checkpoint_project_prefix(project)
        app_ids = {key[1:]: apps.decode_app("", raw).app_id   # project \0 name -> app_id
                   for key, raw in await self._store.meta_scan(app_scan)}
        for key, raw in await self._store.meta_scan(checkpoint_scan):
            sid, p = apps.checkpoint_ref(key)
            config = self._catalogue.by_id(sid)
            if config is None or p >= config.readable_partition_count:
                continue
            owner, app = key[1:-12].split(b"\0")[:2]
            checkpoint = apps.checkpoint_of(raw, app_ids.get(owner + b"\0" + app))
            if checkpoint is None:   # of an app deleted (maybe made again) through another broker
                continue
            if len(out) >= max_series:
                left_out += 1
                continue
            b = await self._store.bounds(sid, p)
            state = PartitionConsumerState(p, checkpoint, b.first_seq, b.last_seq)
            out.append((owner.decode(), app.decode(), config.stream_name, p, state.lag))
        return out, left_out

    async def consumer_state(self, project: str, app_name: object, stream_name: object,
                             checkpoint_type: object = "LAST_READ", start_after_partition: object = None,
                             limit: int | None = None) -> tuple[list[PartitionConsumerState], bool]:
        """Per partition: checkpoint vs. retained range (lag). Raises APP_NOT_FOUND,
        STREAM_NOT_FOUND, APP_NO_CHECKPOINT, INVALID_PARTITION_ID, INVALID_REQUEST."""
        name, app_id, config = await self._target(project, app_name, stream_name, checkpoint_type)
        limit = clip_page(limit, self._limits.default_partition_page, self._limits.max_partition_page, "limit")
        start = self._catalogue.page_start(config, start_after_partition)
        chosen = range(start, min(start + limit, config.readable_partition_count))
        sid = config.stream_id
        marks = {apps.checkpoint_ref(k)[1]: mark
                 for k, v in await self._store.meta_scan(apps.checkpoint_stream_prefix(project, name, sid))
                 if (mark := apps.checkpoint_of(v, app_id)) is not None}
        if not marks:
            raise client_error(ErrorCode.APP_NO_CHECKPOINT, app=name, stream=config.stream_name)
        out = []
        for p in chosen:
            b = await self._store.bounds(sid, p)
            out.append(PartitionConsumerState(p, marks.get(p), b.first_seq, b.last_seq,
                                              self._catalogue.partition_status(config, p)))
        return out, chosen.stop < config.readable_partition_count
