"""The layering and the error catalogue, checked rather than hoped for.

Import direction: api -> core -> storage.base <- storage.rocks|memory|jetstream; model and errors under
all. The core never sees a wire format or a storage engine; only storage/rocks_engine.py imports rocksdict.
"""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from broker.api.grpc_render import status_code as grpc_status
from broker.api.render import TIMEPLUS, TSDB, dis_error_body, http_status
from broker.errors import BrokerError, ErrorCode

BROKER = Path(__file__).resolve().parents[1] / "broker"
WIRE = ("grpc", "aiohttp", "google.protobuf", "client", "orjson")


_IMPORTS = """
import ast, json, sys
out = {}
for name in sys.argv[1:]:
    found = set()
    for node in ast.walk(ast.parse(open(name, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    out[name] = sorted(found)
print(json.dumps(out))
"""


@functools.cache
def _all_imports() -> dict[str, set[str]]:
    """Every broker module's absolute imports, parsed in a fresh interpreter: CPython 3.11.7's AST
    converter can be left in a bad state by an earlier RecursionError in this long-lived test
    process ("SystemError: AST constructor recursion depth mismatch", fixed in later 3.11s), and
    the layering must not depend on which tests ran before."""
    files = [str(p) for p in sorted(BROKER.rglob("*.py"))]
    done = subprocess.run([sys.executable, "-c", _IMPORTS, *files], capture_output=True, text=True, check=True,
                          timeout=120)
    return {name: set(found) for name, found in json.loads(done.stdout).items()}


def imports_of(path: Path) -> set[str]:
    return _all_imports()[str(path)]


def modules(sub: str) -> list[Path]:
    return sorted((BROKER / sub).rglob("*.py")) if (BROKER / sub).is_dir() else [BROKER / sub]


def _hits(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in imports_of(path) if any(m == p or m.startswith(p + ".") for p in prefixes)]


@pytest.mark.parametrize("path", modules("core") + modules("storage") + [BROKER / "model.py"], ids=str)
def test_core_and_storage_know_no_wire_format(path: Path) -> None:
    assert _hits(path, WIRE) == []


@pytest.mark.parametrize("path", modules("core") + modules("api"), ids=str)
def test_core_and_doors_never_touch_a_storage_engine(path: Path) -> None:
    assert _hits(path, ("rocksdict", "broker.storage.rocks", "broker.storage.rocks_engine",
                        "broker.storage.memory")) == []


@pytest.mark.parametrize("path", modules("core"), ids=str)
def test_the_core_reaches_storage_only_through_the_interface(path: Path) -> None:
    assert set(_hits(path, ("broker.storage",))) <= {"broker.storage.base"}


def test_every_registered_store_declares_the_interface() -> None:
    """Explicit subclassing is what makes mypy check a store against the protocol."""
    import importlib

    from broker.storage import STORES
    from broker.storage.base import Store
    for target in STORES.values():
        module, _, name = target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert Store in cls.__mro__, f"{target} does not declare the Store interface"
        assert callable(getattr(cls, "from_settings", None)), f"{target} has no from_settings factory"


def test_the_package_map_names_every_module() -> None:
    import broker
    documented = broker.__doc__ or ""
    missing = [p.relative_to(BROKER).as_posix() for p in sorted(BROKER.rglob("*.py"))
               if p.name != "__init__.py" and p.name not in documented]
    assert missing == [], f"add these to the package map in broker/__init__.py: {missing}"


@pytest.mark.parametrize("path", modules("api"), ids=str)
def test_doors_do_not_import_storage(path: Path) -> None:
    assert _hits(path, ("broker.storage",)) == []


def test_only_rocks_module_imports_rocksdict() -> None:
    users = [p.name for p in BROKER.rglob("*.py") if _hits(p, ("rocksdict",))]
    assert users == ["rocks_engine.py"]


def test_errors_module_imports_nothing_from_broker() -> None:
    assert _hits(BROKER / "errors.py", ("broker",)) == []


def test_only_app_imports_the_doors() -> None:
    users = {p.relative_to(BROKER).as_posix() for p in BROKER.rglob("*.py")
             if p.parent.name != "api" and _hits(p, ("broker.api",))}
    assert users == {"app.py"}


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_every_catalogue_row_renders_on_every_protocol(code: ErrorCode) -> None:
    assert re.fullmatch(r"DIS\.\d{4}", code.dis_code)
    assert 400 <= code.http_status <= 599
    error = BrokerError(code, detail="d", stream="s", partition_id="p", cursor_type="c", value="v", given=1,
                        earliest=0, latest=2, seq=0, method="GET", path="/x", request_id="r", app="a",
                        row=3, column="c", function="f", query_id="q", property="p", source="src",
                        metric="m")
    assert grpc_status(error) in set(grpc.StatusCode)
    assert grpc_status(error) not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)
    assert http_status(error) == (400 if code.http_status == 429 else code.http_status)
    body = dis_error_body(error)
    assert body == {"error_code": code.dis_code, "error_msg": error.message,
                    "errorCode": code.dis_code, "message": error.message, "reason": code.name}
    assert "{" not in error.message, "a template placeholder was left unfilled"
    assert TIMEPLUS.status(error) == (404 if code.grpc_status == "NOT_FOUND" else
                                      429 if code is ErrorCode.THROTTLED else code.http_status)
    assert TIMEPLUS.body(error) == {"code": code.timeplus_code, "message": error.message, "system": "proton",
                                  "reason": code.name}
    assert TSDB.status(error) == code.http_status
    assert TSDB.body(error) == {"error": {"code": code.http_status, "message": error.message}, "reason": code.name}


def test_client_and_server_faults_are_split_by_status() -> None:
    for code in ErrorCode:
        assert BrokerError(code).is_server_fault == (code.http_status >= 500)


@pytest.mark.parametrize("path", modules("core"), ids=str)
def test_the_core_knows_nothing_of_sources(path: Path) -> None:
    """Sources are producers of the core, like the doors: the dependency points one way."""
    assert _hits(path, ("broker.sources", "broker.api")) == []


@pytest.mark.parametrize("path", modules("sources"), ids=str)
def test_sources_reach_the_core_not_doors_or_storage(path: Path) -> None:
    assert _hits(path, ("broker.api", "broker.storage")) == []
