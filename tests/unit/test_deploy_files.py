"""The Dockerfile, compose file and Kubernetes manifests cannot run here; keep them consistent with the code."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml

from consumer.cli import COMMANDS
from consumer.config import ENV_DELIMITER, ENV_PREFIX, Settings

ROOT = Path(__file__).parent.parent
ENV_NAME = re.compile(r"\bSHUNT_[A-Z0-9_]+\b")


def config_reads(name: str) -> bool:
    """Whether ``name`` is an environment variable the configuration really reads."""
    if name == "SHUNT_CONFIG":
        return True
    section, _, key = name.removeprefix(ENV_PREFIX).lower().partition(ENV_DELIMITER.lower())
    field = Settings.model_fields.get(section)
    model: Any = field.annotation if field else None
    return model is not None and key in model.model_fields


def env_names(text: str) -> set[str]:
    return set(ENV_NAME.findall(text))


def deploy_texts() -> dict[str, str]:
    paths = [ROOT / "Dockerfile", ROOT / "ops" / "compose.yaml", *sorted((ROOT / "ops" / "k8s").glob("*.yaml"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_every_env_name_in_deploy_files_is_read_by_the_config() -> None:
    seen = set()
    for name, text in deploy_texts().items():
        for env in env_names(text):
            assert config_reads(env), f"{name} sets {env}, which the configuration does not read"
            seen.add(env)
    assert "SHUNT_LLM__API_KEY" in seen and "SHUNT_KAFKA__BOOTSTRAP_SERVERS" in seen


def test_config_reads_rejects_made_up_names() -> None:
    assert not config_reads("SHUNT_LLM__API_KAY")
    assert not config_reads("SHUNT_NOPE__RPM")


def test_yaml_files_parse_and_reference_each_other() -> None:
    compose = yaml.safe_load((ROOT / "ops" / "compose.yaml").read_text())
    assert {"kafka", "topics", "llm", "shunt"} <= set(compose["services"])
    shunt = compose["services"]["shunt"]
    assert shunt["build"]["dockerfile"] == "Dockerfile"
    assert (ROOT / "ops" / shunt["build"]["context"] / "Dockerfile").exists()
    assert set(shunt["secrets"]) <= set(compose["secrets"])
    assert shunt["environment"]["SHUNT_LLM__BASE_URL"].startswith("http://llm:8089")
    k8s = {doc["kind"]: doc for p in (ROOT / "ops" / "k8s").glob("*.yaml") for doc in yaml.safe_load_all(p.read_text())}
    deployment, configmap, secret = k8s["Deployment"], k8s["ConfigMap"], k8s["Secret"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
    key_ref = next(e for e in container["env"] if e["name"] == "SHUNT_LLM__API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"] and key_ref["key"] in secret["stringData"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    admin_port = int(configmap["data"]["SHUNT_ADMIN__PORT"])
    assert container["ports"][0]["containerPort"] == admin_port
    assert container["image"] == compose["services"]["shunt"]["image"]


def test_dockerfile_entrypoint_runs_a_real_command_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE)
    assert entry is not None
    program, *args = yaml.safe_load(entry.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts
    assert args and args[0] in COMMANDS
    assert "/healthz" in text and "HEALTHCHECK" in text
    assert re.search(r"^USER\s+(?!root)\w+", text, re.MULTILINE), "runs as non-root"
    assert "EXPOSE 8080" in text and "SHUNT_ADMIN__PORT=8080" in text
    for copied in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        for part in shlex.split(copied):
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"
