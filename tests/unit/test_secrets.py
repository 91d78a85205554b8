"""Secrets never reach `shunt config show`, error messages or logs, however they were supplied (issue 15).

The commands run as real subprocesses (`python -m consumer ...`), so what they print and log is what an
operator would see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from consumer.config import load_settings, redacted_dump, secret_values
from consumer.errors import ConfigError
from consumer.logs import SecretRedactor, is_secret_key

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7secretkeymaterial0001\n"
    "b2theWxldHNwcmV0ZW5kdGhpc2lzYXByaXZhdGVrZXlsaW5ldHdvMDAwMDAwMDAwMDAwMDAw\n"
    "-----END PRIVATE KEY-----\n"
)
OAUTH = "clientId=shunt clientSecret=oauth-client-secret-7d1e principal=svc"
FILE_PASSWORD = "sasl-from-file-5b2c91"
ENV_KEYSTORE = "keystore-pass-from-env-88a1"
TOML_PASSPHRASE = "assertion-passphrase-3f0e"


def write_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    secret_file = tmp_path / "sasl_password"
    secret_file.write_text(FILE_PASSWORD + "\n", encoding="utf-8")
    toml = tmp_path / "shunt.toml"
    toml.write_text(
        "[kafka]\n"
        f'sasl_password_file = "{secret_file}"\n'
        "[kafka.common]\n"
        '"security.protocol" = "sasl_ssl"\n'
        f'"ssl.key.pem" = """{PEM}"""\n'
        f'"sasl.oauthbearer.config" = "{OAUTH}"\n'
        f'"sasl.oauthbearer.assertion.private.key.passphrase" = "{TOML_PASSPHRASE}"\n'
        '"ssl.certificate.pem" = "public-cert-stays-visible"\n',
        encoding="utf-8",
    )
    env = {"SHUNT_KAFKA__PRODUCER": orjson.dumps({"ssl.keystore.password": ENV_KEYSTORE}).decode()}
    return toml, env


def secrets_in(text: str) -> list[str]:
    pem_lines = [line for line in PEM.splitlines() if not line.startswith("-----")]
    candidates = [OAUTH, "oauth-client-secret-7d1e", FILE_PASSWORD, ENV_KEYSTORE, TOML_PASSPHRASE, *pem_lines]
    return [secret for secret in candidates if secret in text]


def shunt(args: list[str], env: dict[str, str], code: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "consumer", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")} | env
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=50, check=False)


def test_config_show_prints_none_of_the_secrets(tmp_path: Path) -> None:
    toml, env = write_config(tmp_path)
    shown = shunt(["config", "show", "--config", str(toml)], env)
    assert shown.returncode == 0, shown.stderr
    assert secrets_in(shown.stdout + shown.stderr) == []
    data = orjson.loads(shown.stdout)
    common = data["kafka"]["common"]
    assert common["ssl.key.pem"] == common["sasl.oauthbearer.config"] == "**********"
    assert data["kafka"]["producer"]["ssl.keystore.password"] == "**********"
    assert common["ssl.certificate.pem"] == "public-cert-stays-visible"  # public material is not a secret


def test_every_secret_is_masked_in_logs_however_it_was_supplied(tmp_path: Path) -> None:
    toml, env = write_config(tmp_path)
    # What every command does (settings_from), then an error that quotes secrets, as a client library might.
    code = (
        "from pathlib import Path\n"
        "import structlog\n"
        "from consumer.commands.common import settings_from\n"
        "from consumer.config import librdkafka_config\n"
        f"s = settings_from(Path({str(toml)!r}))\n"
        "conf = librdkafka_config(s.kafka, 'producer')\n"
        "quoted = ' | '.join(str(conf[k]) for k in ('ssl.key.pem', 'sasl.oauthbearer.config', 'sasl.password',"
        " 'ssl.keystore.password', 'sasl.oauthbearer.assertion.private.key.passphrase'))\n"
        "first_line = conf['ssl.key.pem'].splitlines()[1]\n"
        "structlog.get_logger().error('kafka_error', detail='bad config: ' + quoted, partial=first_line,"
        " conf=conf)\n"
    )
    run = shunt([], env | {"SHUNT_SERVICE__LOG_FORMAT": "json"}, code=code)
    assert run.returncode == 0, run.stderr
    assert "kafka_error" in run.stderr and "**********" in run.stderr
    assert secrets_in(run.stderr) == [] and secrets_in(run.stdout) == []


def test_an_invalid_secret_value_is_not_quoted_in_the_error(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(f'[kafka.common]\n"sasl.oauthbearer.config" = ["{OAUTH}"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(toml)
    assert "sasl.oauthbearer.config" in str(caught.value) and secrets_in(str(caught.value)) == []
    shown = shunt(["config", "show", "--config", str(toml)], {})
    assert shown.returncode != 0 and "<redacted>" in shown.stderr and secrets_in(shown.stderr) == []


def test_secret_values_and_the_dump_cover_every_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml, env = write_config(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHUNT_LLM__API_KEY", "sk-env-api-key-0042")
    settings = load_settings(toml)
    values = secret_values(settings)
    assert {PEM, OAUTH, FILE_PASSWORD, ENV_KEYSTORE, TOML_PASSPHRASE, "sk-env-api-key-0042"} <= set(values)
    dump = orjson.dumps(redacted_dump(settings)).decode()
    assert secrets_in(dump) == [] and "sk-env-api-key-0042" not in dump


def test_the_librdkafka_secret_keys_are_known_and_paths_are_not() -> None:
    secret = [
        "sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem", "ssl_key",
        "sasl.oauthbearer.config", "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.client.credentials.client.secret", "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase", "sasl.kerberos.kinit.cmd", "sasl.jaas.config",
        "api_key", "authorization",
    ]  # fmt: skip
    public = [
        "ssl.key.location", "ssl.certificate.pem", "ssl.ca.pem", "sasl.kerberos.keytab", "sasl.username",
        "sasl.oauthbearer.client.id", "ssl.engine.id", "prompt_tokens", "review_id",
    ]  # fmt: skip
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in public if is_secret_key(k)] == []


def test_the_redactor_masks_nested_fields_and_partial_pem_lines() -> None:
    redactor = SecretRedactor([PEM])
    line = PEM.splitlines()[2]
    event = redactor(None, "error", {"event": "x", "conf": {"ssl.key.pem": PEM, "n": 1}, "msg": f"at {line} end"})
    assert event["conf"] == {"ssl.key.pem": "**********", "n": 1}
    assert event["msg"] == "at ********** end"
