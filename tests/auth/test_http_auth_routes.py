"""The HTTP app's routes with and without credentials: with an auth file no route of any door
escapes its door's check; without one every handler is registered bare (nothing runs per request).
The health endpoints stay open on purpose, and /metrics checks for an admin key itself
(api/metrics.py); they are the broker's, not a door's. The web console's page files hold no data
and are served without a key (its API is checked like any door)."""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

from broker.api import console, dis, tail, timeplus, tsdb
from broker.api.http_app import build_http_app, build_tsdb_http_app
from broker.auth import Auth
from broker.core.broker import Broker
from broker.storage.memory import MemoryStore
from broker.tsdb.series import TsdbStream

OWN_CHECK = {"/healthz", "/readyz", "/metrics"}
OPEN_FILES = {console.asset, console.redirect}
BARE = {h for table in (dis.ROUTES, timeplus.ROUTES, tsdb.ROUTES, console.ROUTES) for _, _, h, _ in table} | {tail.tail}


def handlers(root: web.Application) -> list[tuple[str, str, object]]:
    """(method, path, handler) of every route of every door mounted on `root` (a rule-matched
    sub-app's routes are listed by the root's router too: each once here)."""
    out: dict[tuple[str, str, int], tuple[str, str, object]] = {}
    for app in [root, *(getattr(r, "_app", None) for r in root.router.resources())]:
        if app is None:
            continue
        for route in app.router.routes():
            if route.method != "HEAD" and not hasattr(route.resource, "_app"):
                path = route.resource.canonical if route.resource else ""
                if path in OWN_CHECK or route.handler in OPEN_FILES:
                    continue
                out[(route.method, path, id(route.handler))] = (route.method, path, route.handler)
    return list(out.values())


def auth(tmp_path: Path) -> Auth:
    path = tmp_path / "auth.toml"
    path.write_text('[[api_keys]]\nkey = "k"\nworkspace = "p1"\n[[access_keys]]\nak = "a"\nsk = "s"\n'
                    'project_id = "p1"\n')
    return Auth(str(path))


def test_without_an_auth_file_every_handler_is_bare(tmp_path: Path) -> None:
    broker = Broker(MemoryStore())
    for given in (None, Auth(None)):
        routes = handlers(build_http_app(broker, body_timeout_s=5, auth=given))
        assert len(routes) > 60
        assert all(h in BARE for _, _, h in routes), [r for r in routes if r[2] not in BARE]


def test_with_an_auth_file_no_route_escapes_the_check(tmp_path: Path) -> None:
    broker = Broker(MemoryStore())
    routes = handlers(build_http_app(broker, body_timeout_s=5, auth=auth(tmp_path)))
    tsdb_only = handlers(build_tsdb_http_app(broker, TsdbStream(broker, "p1", "tsdb"), body_timeout_s=5,
                                             auth=auth(tmp_path)))
    assert len(routes) > 60 and len(tsdb_only) == 10
    escaped = [r for r in routes + tsdb_only if r[2] in BARE]
    assert escaped == []
    # each a door's check wrapped around a door's handler (keeping its name: metrics label by it)
    assert all(getattr(h, "__wrapped__", None) in BARE for _, _, h in routes + tsdb_only)
    assert {h.__code__.co_name for _, _, h in routes + tsdb_only} == {"guarded", "signed"}  # type: ignore[attr-defined]


def test_health_stays_open_and_metrics_asks_for_an_admin(tmp_path: Path) -> None:
    from broker.api.metrics import Exporter

    root = build_http_app(Broker(MemoryStore()), body_timeout_s=5, auth=auth(tmp_path))
    own = {r.resource.canonical: r.handler for r in root.router.routes()
           if r.method == "GET" and r.resource is not None and r.resource.canonical in OWN_CHECK}
    assert {path: h.__func__ for path, h in own.items()} == {   # type: ignore[attr-defined]
        "/healthz": Exporter.healthz, "/readyz": Exporter.readyz, "/metrics": Exporter.metrics}
