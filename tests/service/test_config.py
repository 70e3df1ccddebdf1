"""One typed config from flags and CHAT_* environment variables."""

from __future__ import annotations

import pytest

from service.config import load_config


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
    (["--port", "70000"], "--port"),
    (["--max-batch-size", "0"], "--max-batch-size"),
])
def test_bad_values_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_config(argv, {})
    assert message in capsys.readouterr().err


def test_bad_environment_value_names_the_variable(capsys):
    with pytest.raises(SystemExit):
        load_config([], {"CHAT_PORT": "eighty"})
    assert "CHAT_PORT" in capsys.readouterr().err
