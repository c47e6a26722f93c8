"""The Host names the HTTP ports answer to (broker/api/hosts.py, `--allowed-hosts`): a page that
made its own name resolve to 127.0.0.1 (DNS rebinding) is same-origin to a local broker, so it
could read every answer of an open one and pass the cross-site check of writes; its requests name
its host, and an open broker on loopback now refuses them, on every HTTP port and door."""
from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from broker.api.hosts import AllowedHosts
from broker.settings import parse_settings

EVIL = "rebind.example"


def send(port: int, method: str, path: str, host: str | None, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# one read per door: DIS, Timeplus, OpenTSDB, the tail, the console, /metrics
READS = ["/v2/default/streams", "/api/v1beta2/streams", "/api/suggest?type=metrics&q=", "/sluice/v1/tail?stream=nope",
         "/console/api/streams", "/metrics"]


@pytest.mark.parametrize("path", READS)
def test_an_open_broker_on_loopback_answers_addresses_and_localhost_only(broker, path) -> None:
    port = broker.http_port
    status, raw = send(port, "GET", path, f"{EVIL}:{port}")
    assert status == 403, (status, raw[:300])
    assert b"Host not allowed" in raw and b"'rebind.example' is not a name this broker answers to" in raw \
        and b"--allowed-hosts" in raw
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST.", f"app.localhost:{port}",
                 f"[::1]:{port}", "[::1]", "10.1.2.3:80", None):
        status, raw = send(port, "GET", path, host)
        assert status != 403, (host, status, raw[:300])


def test_the_refusal_is_each_doors_error_body_and_writes_nothing(broker, stream_name) -> None:
    port = broker.http_port
    status, raw = send(port, "POST", "/v2/default/streams", f"{EVIL}:{port}",
                       json.dumps({"stream_name": stream_name, "partition_count": 1}).encode())
    assert status == 403 and json.loads(raw)["error_code"] == "DIS.4116", raw
    status, raw = send(port, "POST", "/api/put?details", EVIL,
                       b'{"metric":"rebind","timestamp":1700000000,"value":1,"tags":{"h":"a"}}')
    assert status == 403 and json.loads(raw)["error"]["code"] == 403, raw
    status, raw = send(port, "GET", "/api/v1beta2/streams", EVIL)
    assert status == 403 and json.loads(raw)["reason"] == "HOST_NOT_ALLOWED", raw
    status, raw = send(port, "GET", "/v2/default/streams", f"127.0.0.1:{port}")
    assert status == 200 and stream_name.encode() not in raw


def test_allowed_hosts_names_the_others_on_every_port(start_broker) -> None:
    proc = start_broker("--allowed-hosts", "broker.internal,.corp.example", "--tsdb-port", "0",
                        "--metrics-port", "0")
    for port, path in ((proc.http_port, "/v2/default/streams"), (proc.tsdb_port, "/api/suggest?type=metrics&q="),
                       (proc.metrics_port, "/metrics")):
        assert port is not None
        for host in ("broker.internal", f"BROKER.internal:{port}", "corp.example", "a.b.corp.example:1"):
            status, raw = send(port, "GET", path, host)
            assert status == 200, (port, host, status, raw[:300])
        for host in (EVIL, "internal", "broker.internal.evil.example", "xcorp.example"):
            status, raw = send(port, "GET", path, host)
            assert status == 403 and b"--allowed-hosts" in raw, (port, host, status, raw[:300])


def test_an_auth_file_does_not_turn_the_check_off_a_star_does(start_broker, tmp_path: Path) -> None:
    """With an auth file /metrics on --metrics-port and /healthz, /readyz on every port still answer
    without a key: a rebinding page read the stream names in /metrics (the review). Only `*` (the
    operator's choice) answers any name on loopback."""
    auth = tmp_path / "auth.toml"
    auth.write_text('[[api_keys]]\nkey = "k"\nworkspace = "default"\nrole = "admin"\n')
    auth.chmod(0o600)
    guarded = start_broker("--auth-file", str(auth), "--metrics-port", "0", data_dir=tmp_path / "auth")
    assert guarded.metrics_port is not None
    for port, path in ((guarded.metrics_port, "/metrics"), (guarded.http_port, "/healthz"),
                       (guarded.http_port, "/readyz")):
        status, raw = send(port, "GET", path, f"{EVIL}:{port}")
        assert status == 403 and b"--allowed-hosts" in raw, (port, path, status, raw[:300])
        assert send(port, "GET", path, f"localhost:{port}")[0] == 200
    guarded.stop()
    star = start_broker("--allowed-hosts", "*", data_dir=tmp_path / "star")
    status, raw = send(star.http_port, "GET", "/healthz", EVIL)
    assert status == 200, (status, raw[:300])


def test_a_refusal_is_counted_as_itself_not_as_an_auth_failure(broker) -> None:
    """Host refusals were PERMISSION_DENIED, and alerts on sluice_auth_failures_total fired on a
    broker without auth (the review): they are HOST_NOT_ALLOWED now."""
    from prometheus_client.parser import text_string_to_metric_families

    def counted() -> tuple[float, float]:
        text = send(broker.http_port, "GET", "/metrics", "127.0.0.1")[1].decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        return (sum(s.value for s in samples if s.name == "sluice_request_errors_total"
                    and s.labels.get("reason") == "HOST_NOT_ALLOWED"),
                sum(s.value for s in samples if s.name == "sluice_auth_failures_total"))
    before = counted()
    assert send(broker.http_port, "GET", "/v2/default/streams", EVIL)[0] == 403
    after = counted()
    assert after[0] == before[0] + 1 and after[1] == before[1]


def test_a_bad_allowed_hosts_is_a_usage_error(capsys) -> None:
    for bad in ("a b", "host:8080", "http://x", ",,", "a/b"):
        with pytest.raises(SystemExit) as exc:
            parse_settings(["--allowed-hosts", bad])
        assert exc.value.code == 2 and "--allowed-hosts must be host names" in capsys.readouterr().err
    assert parse_settings(["--allowed-hosts", " a.example , .b.example,*"]).allowed_hosts


@pytest.mark.parametrize(("setting", "bind", "checked"), [
    ("", "127.0.0.1", True), ("", "::1", True), ("", "[::1]", True), ("", "localhost", True),
    ("", "127.0.0.2", True), ("", "::ffff:127.0.0.1", True), ("", "0.0.0.0", False), ("", "10.0.0.5", False),
    ("", "::", False), ("", "no-such-host.invalid", False), ("a.example", "0.0.0.0", True),
    ("*", "127.0.0.1", False), ("a.example,*", "127.0.0.1", False),
])
def test_when_the_check_is_on(setting: str, bind: str, checked: bool) -> None:
    assert (AllowedHosts.of(setting, bind=bind) is not None) is checked


def test_an_open_broker_on_another_address_says_it_is_reachable_by_rebinding(start_broker) -> None:
    quiet = start_broker("--host", "0.0.0.0", "--allowed-hosts", "broker.internal")
    warned = start_broker("--host", "0.0.0.0", data_dir=quiet.data_dir.parent / "warned")
    assert any("DNS rebinding" in line for line in warned.startup_log())
    assert not any("DNS rebinding" in line for line in quiet.startup_log())
