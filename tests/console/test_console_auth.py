"""The console on a broker with an auth file: the page without a key shows the key form and the
401 in the banner; with an admin key of the project it works; a producer key cannot create a
stream (403 in the banner); the static files need no key; the key never appears in the broker's
(DEBUG) log."""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from playwright.sync_api import expect

from broker.launcher import BrokerProcess

from .conftest import http


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {"admin": secrets.token_hex(30), "producer": secrets.token_hex(30)}


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, str]):
    root = tmp_path_factory.mktemp("console-auth")
    auth = Path(root / "auth.toml")
    auth.write_text("".join(f'[[api_keys]]\nkey = "{key}"\nworkspace = "p1"\nrole = "{role}"\n\n'
                            for role, key in keys.items()))
    auth.chmod(0o600)
    proc = BrokerProcess(root / "data", "--auth-file", str(auth), "--log-level", "DEBUG").start()
    yield proc
    proc.stop(30)
    log = "".join(proc.stderr_lines)
    for key in keys.values():
        assert key not in log


def test_api_needs_a_key_but_the_page_does_not(auth_broker, keys):
    assert http(auth_broker, "GET", "/console/")[0] == 200
    assert http(auth_broker, "GET", "/console/app.js")[0] == 200
    status, body = http(auth_broker, "GET", "/console/api/streams?project=p1")
    assert status == 401 and body["reason"].startswith("AUTH_")
    status, body = http(auth_broker, "GET", "/console/api/streams?project=p2", headers={"X-Api-Key": keys["admin"]})
    assert status == 403 and body["reason"] == "PERMISSION_DENIED"
    bearer = {"Authorization": f"Bearer {keys['admin']}"}
    status, body = http(auth_broker, "GET", "/console/api/streams", headers=bearer)
    assert status == 200 and body["project"] == "p1"   # the key's project when none is named
    status, body = http(auth_broker, "POST", "/console/api/streams?project=p1", {"name": "nope", "partitions": 1},
                        headers={"X-Api-Key": keys["producer"]})
    assert status == 403 and body["reason"] == "PERMISSION_DENIED"


def test_the_page_asks_for_the_key_then_works(auth_broker, keys, new_tab):
    tab = new_tab(auth_broker)
    tab.allowed_statuses.update({401, 403})
    page = tab.open("streams")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#banner-text")).to_contain_text("AUTH_")
    tab.shot("auth-key-form")

    page.fill("#key-input", keys["admin"])
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#project")).to_have_value("p1")   # the key's project
    expect(page.locator("#stream-count")).to_have_text("0 streams")
    page.fill("#create-stream input[name=name]", "secured")
    page.click("#create-stream button[type=submit]")
    expect(page.locator("#streams tr[data-stream='secured']")).to_have_count(1)
    tab.go("put/secured")
    page.fill("#put-form textarea[name=data]", "hello")
    page.click("#put-form button[type=submit]")
    expect(page.locator("#put-result")).to_contain_text("sequence number 0")

    # the live tail goes through fetch() with the key (EventSource could not send it)
    tab.go("tail/secured")
    expect(page.locator("#tail-form select[name=partition] option")).to_have_count(1)
    page.select_option("#tail-form select[name=from]", "start")
    page.click("#tail-start")
    expect(page.locator("#tail tbody tr")).to_have_count(1)
    expect(page.locator("#tail tbody")).to_contain_text("hello")
    page.click("#tail-stop")
    tab.go("streams")
    expect(page.locator("#streams tr[data-stream='secured']")).to_contain_text("1")
    tab.shot("auth-with-key")

    # a producer key may write but not manage: the refusal is in the banner
    page.click("#forget-key")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", keys["producer"])
    page.click("#key-form button[type=submit]")
    expect(page.locator("#stream-count")).to_have_text("1 stream")
    page.fill("#create-stream input[name=name]", "not_allowed")
    page.click("#create-stream button[type=submit]")
    expect(page.locator("#banner-text")).to_contain_text("PERMISSION_DENIED")
    assert page.evaluate("sessionStorage.getItem('sluice.apiKey')") == keys["producer"]
