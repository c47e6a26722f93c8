"""A built wheel carries the generated stubs (they are generated at build time, not committed),
and the committed tree holds no generated code."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_generated_stubs(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sluice-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("sluice_pb2.py", "sluice_pb2_grpc.py", "sluice_pb2.pyi"):
        assert f"client/_pb/sluice/v1/{stub}" in names
    assert "client/py.typed" in names
    assert any(n.startswith("broker/core/") for n in names)
    # the web console's page is package data, served from the installed package
    for asset in ("index.html", "style.css", "app.js", "page-streams.js"):
        assert f"broker/api/console/{asset}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sluice-broker = broker.__main__:main" in text and "sluice = client.cli:main" in text


def test_generated_code_is_not_committed() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "_pb2" not in tracked
