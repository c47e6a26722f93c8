"""Every source type by its `type` name (shared/spec/sources.md): the one list the manager and the
doors read. A type not here is refused at create time."""
from __future__ import annotations

from broker.sources import generator, websocket
from broker.sources.base import SourceType

TYPES: dict[str, SourceType] = {t.name: t for t in (generator.TYPE, websocket.TYPE)}
