"""One typed config from flags and CHAT_* environment variables."""

from __future__ import annotations

import pytest

from service.config import load_config, read_auth_token


def test_defaults_follow_api_py():
    config = load_config([], {})
    assert (config.port, config.host) == (50051, "127.0.0.1")
    assert config.defaults.max_length == 2048
    assert config.defaults.top_p == 0.7
    assert config.defaults.temperature == 0.95
    assert config.log_prompts is False


def test_flags_win_over_environment():
    env = {"CHAT_PORT": "6000", "CHAT_TEMPERATURE": "0.5", "CHAT_MAX_BATCH_SIZE": "4", "CHAT_LOG_PROMPTS": "yes"}
    config = load_config(["--port", "7000", "--model", "/m.gguf", "--dtype", "float16"], env)
    assert config.port == 7000 and config.model == "/m.gguf" and config.dtype == "float16"
    assert config.defaults.temperature == 0.5
    assert config.limits.max_batch_size == 4
    assert config.log_prompts is True


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "0"], "--top-p"),
    (["--dtype", "int3"], "--dtype"),
    (["--quantize", "int3"], "--quantize"),
    (["--compile", "maybe"], "--compile"),
    (["--prefill-chunk-tokens", "0"], "--prefill-chunk-tokens"),
    (["--kv-cache-tokens", "10"], "--kv-cache-tokens"),
    (["--port", "70000"], "--port"),
    (["--max-batch-size", "0"], "--max-batch-size"),
])
def test_bad_values_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_config(argv, {})
    assert message in capsys.readouterr().err


def test_compile_is_a_switch_with_auto_as_default():
    assert load_config([], {}).compile == "auto"
    assert load_config(["--compile"], {}).compile == "on"
    assert load_config(["--compile", "off"], {}).compile == "off"
    assert load_config(["--no-compile"], {"CHAT_COMPILE": "on"}).compile == "off"
    assert load_config([], {"CHAT_COMPILE": "on"}).compile == "on"


def test_bad_compile_from_the_environment_names_the_variable(capsys):
    with pytest.raises(SystemExit):
        load_config([], {"CHAT_COMPILE": "sometimes"})
    assert "--compile must be auto, on, graphs or off" in capsys.readouterr().err


def test_bad_environment_value_names_the_variable(capsys):
    with pytest.raises(SystemExit):
        load_config([], {"CHAT_PORT": "eighty"})
    assert "CHAT_PORT" in capsys.readouterr().err


def test_security_settings_from_flags_and_environment(tmp_path):
    cert, key, ca, token = (tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem", "token"))
    for path in (cert, key, ca):
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    token.write_text("from-a-file\n")
    config = load_config(["--tls-cert", str(cert), "--tls-key", str(key), "--no-reflection"],
                         {"CHAT_TLS_CLIENT_CA": str(ca), "CHAT_AUTH_TOKEN_FILE": str(token)})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (str(cert), str(key), str(ca))
    assert config.reflection is False
    assert read_auth_token(config) == "from-a-file"
    assert load_config([], {"CHAT_REFLECTION": "false"}).reflection is False
    assert load_config(["--reflection"], {"CHAT_REFLECTION": "false"}).reflection is True
    assert load_config(["--log-prompts"], {}).log_prompts is True  # a bare boolean flag means true
    assert read_auth_token(load_config([], {"CHAT_AUTH_TOKEN": "t0ken"})) == "t0ken"
    assert read_auth_token(load_config([], {})) == ""


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "no such file"),
    (["--auth-token", "a", "--auth-token-file", "/etc/hostname"], "not both"),
    (["--max-message-bytes", "0"], "--max-message-bytes"),
])
def test_bad_security_settings_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_config(argv, {})
    assert message in capsys.readouterr().err


def test_http_metrics_health_and_tracing_settings():
    defaults = load_config([], {})
    assert (defaults.http, defaults.http_port, defaults.metrics) == (True, 8080, True)
    assert (defaults.health_port, defaults.drain_delay_seconds, defaults.otlp_endpoint) == (0, 0.0, "")
    config = load_config(["--http-port", "0", "--no-metrics", "--health-port", "50052", "--drain-delay-seconds", "5",
                          "--otlp-endpoint", "http://collector:4317"], {"CHAT_HTTP": "false"})
    assert (config.http, config.http_port, config.metrics) == (False, 0, False)
    assert (config.health_port, config.drain_delay_seconds, config.otlp_endpoint) == (50052, 5.0, "http://collector:4317")


@pytest.mark.parametrize("argv, message", [
    (["--http-port", "70000"], "--http-port"),
    (["--health-port", "-1"], "--health-port"),
    (["--drain-delay-seconds", "-1"], "--drain-delay-seconds"),
])
def test_bad_http_and_health_settings_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_config(argv, {})
    assert message in capsys.readouterr().err
