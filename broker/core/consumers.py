"""The consumer verbs of the Broker: apps, checkpoints, consumer state (lag) and group leases.

A mixin so that `Broker` stays one facade (front doors call `broker.<verb>`) while the file of
stream and record verbs stays readable. It uses the Broker's store, writer, admin lock, clock,
lease table and stream catalogue; it owns no state of its own.
"""
from __future__ import annotations

import asyncio
import bisect
import uuid
from typing import TYPE_CHECKING, Callable, Sequence

from broker.core import apps
from broker.core.apps import AppInfo, Checkpoint, PartitionConsumerState
from broker.core.limits import SEQUENCE_MAX, Limits, clip_page
from broker.errors import ErrorCode, client_error
from broker.model import StreamConfig

if TYPE_CHECKING:
    from broker.core.leases import LeaseTable
    from broker.core.writer import GroupCommitter
    from broker.storage.base import Store


class ConsumerVerbs:
    # provided by Broker
    _store: "Store"
    _committer: "GroupCommitter"
    _admin: asyncio.Lock
    _leases: "LeaseTable"
    _now: Callable[[], int]
    _by_id: dict[int, StreamConfig]
    limits: Limits

    def _stream(self, name: object) -> StreamConfig: ...
    def _partition_of(self, config: StreamConfig, partition_id: object) -> int: ...

    async def _app(self, name: object) -> tuple[str, bytes]:
        name = apps.check_app_name(name)
        raw = await asyncio.to_thread(self._store.meta_get, apps.app_key(name))
        if raw is None:
            raise client_error(ErrorCode.APP_NOT_FOUND, app=name)
        return name, raw

    async def create_app(self, name: object) -> AppInfo:
        """Raises INVALID_REQUEST, APP_EXISTS, APP_QUOTA_EXCEEDED."""
        name = apps.check_app_name(name)
        async with self._admin:
            existing = await asyncio.to_thread(self._store.meta_scan, apps.APP_PREFIX)
            if any(k == apps.app_key(name) for k, _ in existing):
                raise client_error(ErrorCode.APP_EXISTS, app=name)
            if len(existing) >= self.limits.max_apps:
                raise client_error(ErrorCode.APP_QUOTA_EXCEEDED, detail=f"at most {self.limits.max_apps} apps")
            info = AppInfo(name, uuid.uuid4().hex, self._now())
            await self._committer.run_blocking(self._store.meta_write,
                                               {apps.app_key(name): apps.encode_app(info.app_id, info.created_ms)})
        return info

    async def _app_streams(self, name: str) -> tuple[str, ...]:
        keys = await asyncio.to_thread(self._store.meta_scan, apps.checkpoint_prefix(name))
        ids = {apps.checkpoint_ref(k)[0] for k, _ in keys}
        return tuple(sorted(self._by_id[i].name for i in ids if i in self._by_id))

    async def describe_app(self, name: object) -> AppInfo:
        """Raises INVALID_REQUEST, APP_NOT_FOUND."""
        name, raw = await self._app(name)
        return apps.decode_app(name, raw, await self._app_streams(name))

    async def list_apps(self, limit: int | None = None, start_after: str | None = None,
                        stream_name: str | None = None) -> tuple[int, list[AppInfo], bool]:
        """(total, page, has_more) in name order; with `stream_name`, only apps that committed a
        checkpoint on that stream. Raises INVALID_REQUEST, STREAM_NOT_FOUND."""
        limit = clip_page(limit, self.limits.default_app_page, self.limits.max_app_page, "limit")
        rows = await asyncio.to_thread(self._store.meta_scan, apps.APP_PREFIX)
        infos = [apps.decode_app(k[1:].decode(), v, await self._app_streams(k[1:].decode())) for k, v in rows]
        if stream_name:
            self._stream(stream_name)
            infos = [i for i in infos if stream_name in i.stream_names]
        start = bisect.bisect_right([i.name for i in infos], start_after) if start_after else 0
        return len(infos), infos[start:start + limit], start + limit < len(infos)

    async def delete_app(self, name: object) -> None:
        """Delete an app and all its checkpoints. Raises INVALID_REQUEST, APP_NOT_FOUND."""
        async with self._admin:
            name, _ = await self._app(name)
            doomed: dict[bytes, bytes | None] = {apps.app_key(name): None}
            for key, _ in await asyncio.to_thread(self._store.meta_scan, apps.checkpoint_prefix(name)):
                doomed[key] = None
            await self._committer.run_blocking(self._store.meta_write, doomed)

    async def commit_checkpoint(self, app_name: object, stream_name: object, partition_id: object,
                                sequence_number: object, metadata: object = None,
                                checkpoint_type: object = "LAST_READ") -> None:
        """Record that `app` has processed `partition` up to and including `sequence_number`.
        Raises APP_NOT_FOUND, STREAM_NOT_FOUND, INVALID_PARTITION_ID, PARTITION_NOT_FOUND,
        INVALID_SEQUENCE, SEQUENCE_OUT_OF_RANGE, INVALID_REQUEST."""
        apps.check_checkpoint_type(checkpoint_type)
        name, _ = await self._app(app_name)
        config = self._stream(stream_name)
        p = self._partition_of(config, partition_id)
        if metadata is not None and (not isinstance(metadata, str) or len(metadata) > apps.MAX_METADATA_CHARS):
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"metadata must be a string of at most {apps.MAX_METADATA_CHARS} characters")
        if not isinstance(sequence_number, str) or not sequence_number.isascii() or not sequence_number.isdigit() \
                or int(sequence_number) > SEQUENCE_MAX:
            raise client_error(ErrorCode.INVALID_SEQUENCE, value=sequence_number)
        seq = int(sequence_number)
        bounds = await asyncio.to_thread(self._store.bounds, config.stream_id, p)
        if not max(bounds.first_seq - 1, 0) <= seq <= bounds.last_seq:
            raise client_error(ErrorCode.SEQUENCE_OUT_OF_RANGE, given=seq, earliest=bounds.first_seq,
                               latest=max(bounds.first_seq, bounds.last_seq))
        await self._committer.run_blocking(self._store.meta_write, {
            apps.checkpoint_key(name, config.stream_id, p): apps.encode_checkpoint(seq, metadata or "", config.name)})

    async def get_checkpoint(self, app_name: object, stream_name: object, partition_id: object,
                             checkpoint_type: object = "LAST_READ") -> Checkpoint | None:
        """The committed checkpoint, or None. Raises APP_NOT_FOUND, STREAM_NOT_FOUND,
        INVALID_PARTITION_ID, PARTITION_NOT_FOUND, INVALID_REQUEST."""
        apps.check_checkpoint_type(checkpoint_type)
        name, _ = await self._app(app_name)
        config = self._stream(stream_name)
        p = self._partition_of(config, partition_id)
        raw = await asyncio.to_thread(self._store.meta_get, apps.checkpoint_key(name, config.stream_id, p))
        return apps.decode_checkpoint(raw) if raw is not None else None

    async def delete_checkpoint(self, app_name: object, stream_name: object, partition_id: object = None,
                                checkpoint_type: object = "LAST_READ") -> None:
        """Delete one partition's checkpoint, or every partition's when `partition_id` is None."""
        apps.check_checkpoint_type(checkpoint_type)
        name, _ = await self._app(app_name)
        config = self._stream(stream_name)
        if partition_id is None:
            rows = await asyncio.to_thread(self._store.meta_scan, apps.checkpoint_stream_prefix(name, config.stream_id))
            doomed: dict[bytes, bytes | None] = {k: None for k, _ in rows}
        else:
            doomed = {apps.checkpoint_key(name, config.stream_id, self._partition_of(config, partition_id)): None}
        if doomed:
            await self._committer.run_blocking(self._store.meta_write, doomed)

    async def consumer_state(self, app_name: object, stream_name: object, checkpoint_type: object = "LAST_READ",
                             start_after_partition: str | None = None, limit: int | None = None
                             ) -> tuple[list[PartitionConsumerState], bool]:
        """Per partition: checkpoint vs. retained range (lag). Raises APP_NOT_FOUND,
        STREAM_NOT_FOUND, APP_NO_CHECKPOINT, INVALID_PARTITION_ID, INVALID_REQUEST."""
        apps.check_checkpoint_type(checkpoint_type)
        name, _ = await self._app(app_name)
        config = self._stream(stream_name)
        limit = clip_page(limit, self.limits.default_partition_page, self.limits.max_partition_page, "limit")
        start = 0
        if start_after_partition:
            start = self._partition_of(config, start_after_partition) + 1
        chosen = range(start, min(start + limit, config.partition_count))
        sid = config.stream_id

        def collect() -> list[PartitionConsumerState]:
            marks = {apps.checkpoint_ref(k)[1]: apps.decode_checkpoint(v)
                     for k, v in self._store.meta_scan(apps.checkpoint_stream_prefix(name, sid))}
            if not marks:
                raise client_error(ErrorCode.APP_NO_CHECKPOINT, app=name, stream=config.name)
            out = []
            for p in chosen:
                b = self._store.bounds(sid, p)
                out.append(PartitionConsumerState(p, marks.get(p), b.first_seq, b.last_seq))
            return out

        return await asyncio.to_thread(collect), chosen.stop < config.partition_count

    # -- consumer groups -----------------------------------------------------------------------

    async def heartbeat(self, app_name: object, stream_name: object, member_id: object,
                        held: Sequence[int] = (), lease_ms: int | None = None) -> tuple[list[int], int]:
        """A consumer-group member's heartbeat (see core/leases.py). Returns (partitions it may
        work on now, lease_ms). Raises APP_NOT_FOUND, STREAM_NOT_FOUND, INVALID_REQUEST."""
        lim = self.limits
        name, _ = await self._app(app_name)
        config = self._stream(stream_name)
        if not isinstance(member_id, str) or not 1 <= len(member_id) <= 200:
            raise client_error(ErrorCode.INVALID_REQUEST, detail="member_id must be 1-200 characters")
        lease = lease_ms or lim.default_lease_ms
        if not lim.min_lease_ms <= lease <= lim.max_lease_ms:
            raise client_error(ErrorCode.INVALID_REQUEST,
                               detail=f"lease_ms must be within [{lim.min_lease_ms}, {lim.max_lease_ms}]")
        mine = self._leases.heartbeat(name, config.stream_id, config.partition_count, member_id,
                                      set(held), lease, self._now())
        return mine, lease

    async def leave_group(self, app_name: object, stream_name: object, member_id: object) -> None:
        """Release every lease of a member at once (a clean shutdown, no lease timeout to wait)."""
        name, _ = await self._app(app_name)
        config = self._stream(stream_name)
        self._leases.leave(name, config.stream_id, str(member_id))
