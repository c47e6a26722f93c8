"""The `auth` marker of the fuzz suites (registered here: the suite runs with --strict-markers)."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "auth: fuzzes credentials against a broker started with --auth-file; "
                                       "asserts the auth answers strictly once the broker enforces them")
