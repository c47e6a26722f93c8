import pytest

from broker.settings import Settings, parse_settings


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
])
def test_bad_values_are_usage_errors(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, environ=env)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
