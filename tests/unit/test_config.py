"""Configuration: precedence, clear one-line errors that name the key, and secrets that never print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from consumer.config import ConfigError, librdkafka_config, load_settings, redacted_dump
from tests.support.paths import ROOT

SHUNT = [sys.executable, "-m", "consumer"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")}
    return env | extra


def run_shunt(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHUNT, *args], check=False, capture_output=True, text=True, env=_clean_env(**env), timeout=60
    )


def test_defaults_match_the_documented_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SHUNT_")]:
        monkeypatch.delenv(key)
    settings = load_settings()
    assert settings.topics.input == "reviews"
    assert settings.topics.output == "reviews.labeled"
    assert settings.topics.dlq == "reviews.dlq"
    assert settings.topics.metrics == "shunt.metrics"
    assert settings.topics.distill == "reviews.distill"


def test_environment_wins_over_file_and_flags_win_over_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "shunt.toml"
    config.write_text('[router]\nthreshold = 0.5\n[llm]\nrpm = 100\n[topics]\ninput = "from-file"\n')
    monkeypatch.setenv("SHUNT_ROUTER__THRESHOLD", "0.7")
    settings = load_settings(config)
    assert settings.router.threshold == 0.7
    assert settings.llm.rpm == 100
    assert settings.topics.input == "from-file"
    assert load_settings(config, {"router": {"threshold": 0.2}}).router.threshold == 0.2


@pytest.mark.parametrize(
    ("env", "toml", "key"),
    [
        ({"SHUNT_ROUTER__THRESHOLD": "1.7"}, None, "router.threshold"),
        ({}, "[router]\nthreshhold = 0.3\n", "router.threshhold"),
        ({"SHUNT_KAFKA__BOOTSTRAP_SERVERS": "no-port-here"}, None, "kafka.bootstrap_servers"),
        ({"SHUNT_LLM__RPM": "-5"}, None, "llm.rpm"),
        ({"SHUNT_LLM__TPM": "-1"}, None, "llm.tpm"),
        ({}, "[llm]\nbase_url = 'ftp://x'\n", "llm.base_url"),
    ],
)
def test_bad_config_exits_non_zero_with_one_line_naming_the_key(
    tmp_path: Path, env: dict[str, str], toml: str | None, key: str
) -> None:
    args = ["config", "show"]
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        args += ["--config", str(path)]
    result = run_shunt(*args, **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_value_message_says_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUNT_ROUTER__THRESHOLD", "1.7")
    with pytest.raises(ConfigError, match=r"router\.threshold.*SHUNT_ROUTER__THRESHOLD.*1\.7.*less than or equal to 1"):
        load_settings()


def test_config_show_never_prints_the_api_key_or_password() -> None:
    key, password = "sk-test-DO-NOT-PRINT-1234567890", "hunter2-very-secret"
    result = run_shunt("config", "show", SHUNT_LLM__API_KEY=key, SHUNT_KAFKA__SASL_PASSWORD=password)
    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    assert password not in result.stdout + result.stderr
    assert '"api_key": "**********"' in result.stdout


def test_secrets_stay_out_of_repr_and_dump(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("sk-from-file-abcdef\n")
    monkeypatch.setenv("SHUNT_LLM__API_KEY_FILE", str(secret_file))
    settings = load_settings()
    key = settings.llm.resolved_api_key()
    assert key is not None and key.get_secret_value() == "sk-from-file-abcdef"
    assert "sk-from-file" not in repr(settings) + str(redacted_dump(settings))


def test_librdkafka_passthrough_and_sasl_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUNT_KAFKA__COMMON", '{"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN"}')
    monkeypatch.setenv("SHUNT_KAFKA__CONSUMER", '{"fetch.max.bytes": 1048576}')
    monkeypatch.setenv("SHUNT_KAFKA__SASL_PASSWORD", "pw-123456")
    settings = load_settings()
    consumer = librdkafka_config(settings.kafka, "consumer")
    producer = librdkafka_config(settings.kafka, "producer")
    assert consumer["security.protocol"] == "SASL_SSL"
    assert consumer["fetch.max.bytes"] == 1048576
    assert "fetch.max.bytes" not in producer
    assert consumer["sasl.password"] == "pw-123456"
    assert consumer["enable.auto.offset.store"] is False
    assert producer["enable.idempotence"] is True


def test_configuration_reference_matches_the_code() -> None:
    from consumer.configdoc import render

    path = ROOT / "docs" / "configuration.md"
    assert path.read_text(encoding="utf-8") == render(), "regenerate: shunt config docs --write docs/configuration.md"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("CONSUMER", "enable.auto.offset.store", "true"),
        ("CONSUMER", "enable.auto.commit", "false"),
        ("COMMON", "isolation.level", '"read_uncommitted"'),
        ("CONSUMER", "auto.offset.reset", '"latest"'),
        ("PRODUCER", "enable.idempotence", "false"),
        ("COMMON", "enable.idempotence", '"false"'),
        ("PRODUCER", "acks", "1"),
        ("PRODUCER", "request.required.acks", "0"),
        ("PRODUCER", "max.in.flight.requests.per.connection", "6"),
        ("PRODUCER", "max.in.flight", "100"),
        ("PRODUCER", "retries", "0"),
        ("PRODUCER", "delivery.report.only.error", "true"),
        ("PRODUCER", "transactional.id", '"shunt-tx"'),
    ],
)
def test_a_pinned_librdkafka_override_is_refused_naming_the_key(section: str, key: str, value: str) -> None:
    result = run_shunt("run", **{f"SHUNT_KAFKA__{section}": f'{{"{key}": {value}}}'})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert repr(key) in lines[0] and f"kafka.{section.lower()}" in lines[0]
    assert "Traceback" not in result.stderr


def test_overrides_that_keep_the_guarantees_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUNT_KAFKA__PRODUCER", '{"acks": -1, "max.in.flight": 5, "enable.idempotence": "true"}')
    monkeypatch.setenv("SHUNT_KAFKA__CONSUMER", '{"enable.auto.commit": true, "auto.offset.reset": "smallest"}')
    settings = load_settings()
    assert librdkafka_config(settings.kafka, "producer")["max.in.flight"] == 5


def test_a_shunt_variable_naming_no_section_is_refused() -> None:
    result = run_shunt("config", "show", SHUNT_ROUTERR__THRESHOLD="0.5")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SHUNT_ROUTERR__THRESHOLD" in lines[0], result.stderr
    assert run_shunt("config", "show", SHUNT_THRESHOLD="0.5").returncode == 2


def test_shunt_variables_that_are_not_settings_still_work(tmp_path: Path) -> None:
    config = tmp_path / "shunt.toml"
    config.write_text("[router]\nthreshold = 0.42\n")
    result = run_shunt("config", "show", SHUNT_CONFIG=str(config), SHUNT_VENV="/x", SHUNT_DATA_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert '"threshold": 0.42' in result.stdout
