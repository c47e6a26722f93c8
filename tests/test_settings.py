import re
from dataclasses import fields
from pathlib import Path

import pytest

from broker.settings import Settings, option_hint, parse_settings


def test_defaults_without_flags_or_env() -> None:
    assert parse_settings([], environ={}) == Settings()


def test_env_sets_and_flag_overrides() -> None:
    env = {"SLUICE_DATA_DIR": "/tmp/x", "SLUICE_GRPC_PORT": "1234", "SLUICE_HTTP_PORT": "2345", "SLUICE_FSYNC": "true"}
    s = parse_settings(["--http-port", "9999"], environ=env)
    assert (s.data_dir, s.grpc_port, s.http_port, s.fsync) == ("/tmp/x", 1234, 9999, True)
    assert parse_settings(["--no-fsync"], environ=env).fsync is False


@pytest.mark.parametrize("argv, env", [
    (["--grpc-port", "70000"], {}),
    (["--store", "leveldb"], {}),
    ([], {"SLUICE_HTTP_PORT": "eighty"}),
    ([], {"SLUICE_FSYNC": "maybe"}),
    (["--memtable-mb", "0"], {}),
    ([], {"SLUICE_BLOCK_CACHE_MB": "-5"}),
    (["--malloc-arenas", "-1"], {}),
    (["--tsdb-port", "70000"], {}),
    ([], {"SLUICE_TSDB_PORT": "port"}),
    (["--tsdb-stream", "a b"], {}),
    (["--tsdb-stream", ""], {}),
    ([], {"SLUICE_TSDB_PROJECT": "x/y"}),
    (["--subscribe-heartbeat", "0"], {}),
    (["--subscribe-heartbeat", "0.05"], {}),
    (["--subscribe-heartbeat", "3601"], {}),
    ([], {"SLUICE_SUBSCRIBE_HEARTBEAT": "nan"}),
])
def test_bad_values_are_usage_errors(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, environ=env)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, env, named", [
    ([], {"SLUICE_GRPC_PORT": "70000"}, "environment variable SLUICE_GRPC_PORT"),
    (["--grpc-port", "70000"], {"SLUICE_GRPC_PORT": "1"}, "--grpc-port"),
    (["--grpc-port=70000"], {}, "--grpc-port"),
    ([], {"SLUICE_LOG_LEVEL": "loud"}, "environment variable SLUICE_LOG_LEVEL"),
    ([], {"SLUICE_MALLOC_ARENAS": "many"}, "SLUICE_MALLOC_ARENAS='many' is not an integer (it sets --malloc-arenas)"),
    (["--retention-interval", "0"], {}, "--retention-interval"),
    (["--body-timeout", "inf"], {}, "--body-timeout"),
    ([], {"SLUICE_TSDB_STREAM": "no spaces"}, "environment variable SLUICE_TSDB_STREAM"),
    (["--tsdb-port", "-1"], {}, "--tsdb-port"),
    ([], {"SLUICE_TSDB_PORT": "x"}, "SLUICE_TSDB_PORT='x' is not an integer (it sets --tsdb-port)"),
])
def test_a_bad_value_is_one_line_naming_where_it_came_from(argv: list[str], env: dict[str, str], named: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, environ=env)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sluice-broker: error: "), err
    assert named in err


def test_subscribe_heartbeat_in_seconds_from_flag_or_env() -> None:
    assert Settings().subscribe_heartbeat == 15.0
    assert parse_settings(["--subscribe-heartbeat", "0.5"], environ={}).subscribe_heartbeat == 0.5
    assert parse_settings([], environ={"SLUICE_SUBSCRIBE_HEARTBEAT": "30"}).subscribe_heartbeat == 30.0


def test_every_option_is_in_the_readme_table() -> None:
    """The README's table of options names each one's flag and environment variable, once."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(SLUICE_[A-Z_]+)` \|", readme, re.MULTILINE)
    expected = [(f"--{f.name.replace('_', '-')}", f"SLUICE_{f.name.upper()}") for f in fields(Settings)]
    assert sorted(rows) == sorted(expected)


def test_log_level_is_case_insensitive_and_ports_must_differ_unless_zero() -> None:
    assert parse_settings(["--log-level", "debug"], environ={}).log_level == "DEBUG"
    assert parse_settings(["--grpc-port", "0", "--http-port", "0"], environ={}).grpc_port == 0
    with pytest.raises(SystemExit):
        parse_settings(["--grpc-port", "9000", "--http-port", "9000"], environ={})


def test_option_hint_names_flag_and_environment_variable() -> None:
    assert option_hint("http_port") == "--http-port (env SLUICE_HTTP_PORT)"


def test_tsdb_options_default_set_and_clash() -> None:
    s = parse_settings([], environ={})
    assert (s.tsdb_stream, s.tsdb_project, s.tsdb_port) == ("tsdb", "default", None)
    s = parse_settings(["--tsdb-port", "4242", "--tsdb-stream", "points"],
                       environ={"SLUICE_TSDB_PROJECT": "metrics", "SLUICE_TSDB_PORT": "1"})
    assert (s.tsdb_stream, s.tsdb_project, s.tsdb_port) == ("points", "metrics", 4242)
    assert parse_settings([], environ={"SLUICE_TSDB_PORT": "8242"}).tsdb_port == 8242
    assert parse_settings([], environ={"SLUICE_TSDB_PORT": ""}).tsdb_port is None   # empty: unset
    assert parse_settings(["--tsdb-port", "0", "--http-port", "0"], environ={}).tsdb_port == 0
    for argv in (["--tsdb-port", "8080"], ["--tsdb-port", "50051"]):   # the defaults of the other doors
        with pytest.raises(SystemExit):
            parse_settings(argv, environ={})


def test_jetstream_options() -> None:
    s = parse_settings(["--store", "jetstream", "--replicas", "1"],
                       environ={"SLUICE_NATS_SERVERS": "nats://a:4222, tls://b:4223", "SLUICE_NATS_PREFIX": "prod-1"})
    assert (s.store, s.nats_servers, s.nats_prefix, s.replicas) == ("jetstream", "nats://a:4222, tls://b:4223",
                                                                     "prod-1", 1)
    assert (Settings().replicas, Settings().nats_prefix, Settings().nats_creds) == (3, "sluice", None)


@pytest.mark.parametrize("argv, named", [
    (["--store", "jetstream"], "--store jetstream needs --nats-servers"),
    (["--store", "jetstream", "--nats-servers", "http://a:1"], "--nats-servers must be"),
    (["--nats-prefix", "a.b"], "--nats-prefix must be"),
    (["--replicas", "0"], "--replicas must be"),
    (["--nats-creds", ""], "--nats-creds must be"),
])
def test_bad_jetstream_options_are_one_line(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
