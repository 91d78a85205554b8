"""The Dockerfile, compose file and Kubernetes manifests cannot run here; keep them consistent with the code,
valid against the Kubernetes schemas, and startable by the kubelet."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from consumer.cli import COMMANDS
from consumer.config import ENV_DELIMITER, ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "k8s"
SECRET_TEMPLATE = K8S / "templates" / "secret.yaml.example"
COMPOSE_KEY_FILE = ROOT / "ops" / "secrets" / "llm_api_key"
ENV_NAME = re.compile(r"\bSHUNT_[A-Z0-9_]+\b")
# The extensions `kubectl apply -f DIR` reads (k8s.io/cli-runtime FileVisitor: FileExtensions).
KUBECTL_EXTENSIONS = {".json", ".yaml", ".yml"}
# Oldest and newest Kubernetes minor versions the manifests must validate against.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
POD_SPEC_PATHS = {"Deployment": ("spec", "template", "spec"), "Job": ("spec", "template", "spec")}


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


def apply_set(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The files ``kubectl apply -f folder/`` (``-R`` when recursive) would read."""
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in found if p.is_file() and p.suffix in KUBECTL_EXTENSIONS)


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object shipped: the apply set and the Secret template."""
    for path in [*apply_set(K8S, recursive=True), SECRET_TEMPLATE]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield str(path.relative_to(ROOT)), doc


def applied_by_kind() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for path in apply_set(K8S) for doc in yaml.safe_load_all(path.read_text()) if doc}


def deploy_texts() -> dict[str, str]:
    paths = [ROOT / "Dockerfile", ROOT / "ops" / "compose.yaml", *apply_set(K8S, recursive=True), SECRET_TEMPLATE]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def defaults(section: str) -> dict[str, Any]:
    """A section's defaults from the code (not from this process's environment)."""
    model: Any = Settings.model_fields[section].annotation
    return {name: field.default for name, field in model.model_fields.items()}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "ops" / "compose.yaml").read_text())
    return loaded


# --- the Dockerfile ---------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages


def image_user() -> str:
    """The USER the final stage runs as ('root' if it sets none)."""
    users = [args for instruction, args in dockerfile_stages()[-1] if instruction == "USER"]
    return users[-1] if users else "root"


def numeric_uid(user: str) -> int | None:
    """The UID of a Dockerfile USER (``uid`` or ``uid:gid``), or None when it is a name."""
    uid = user.partition(":")[0]
    return int(uid) if uid.isdigit() else None


def build_copies() -> dict[str, str]:
    """What the build stage copies from the context: source path -> destination under WORKDIR."""
    workdir, copies = "/", {}
    for instruction, args in dockerfile_stages()[0]:
        if instruction == "WORKDIR":
            workdir = args
        elif instruction == "COPY" and not args.startswith("--from"):
            *sources, dest = shlex.split(args)
            for source in sources:
                target = dest.rstrip("/") + "/" + source if dest.endswith("/") else dest
                copies[source] = str(Path(workdir) / target)
    return copies


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p.removeprefix("/") for p in patterns if p and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


# --- the kubelet's runAsNonRoot check ---------------------------------------------------------------------


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    node: Any = doc
    for key in POD_SPEC_PATHS.get(doc["kind"], ()):
        node = node[key]
    return node if doc["kind"] in POD_SPEC_PATHS else None


def kubelet_refuses(spec: dict[str, Any], container: dict[str, Any], image_uid: int | None) -> str | None:
    """What the kubelet's verifyRunAsNonRoot says about a container (None: it starts).

    Under ``runAsNonRoot: true`` the effective ``runAsUser`` (container, else pod) must be non-zero; with none,
    the image's USER must be a number other than 0, since a name cannot be verified without the image's
    /etc/passwd ("image has non-numeric user (shunt), cannot verify user is non-root").
    """
    pod_ctx, ctx = spec.get("securityContext") or {}, container.get("securityContext") or {}
    if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot", False)):
        return None
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    if uid is None:
        uid = image_uid
        if uid is None:
            return f"{container['name']}: image has a non-numeric user, cannot verify user is non-root"
    return f"{container['name']}: runs as root (UID 0) under runAsNonRoot" if uid == 0 else None


def image_uid_of(image: str) -> int | None:
    """The numeric USER of an image this repository builds; other images are assumed to name their user."""
    return numeric_uid(image_user()) if image == compose()["services"]["shunt"]["image"] else None


# --- tests ------------------------------------------------------------------------------------------------


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
    services = compose()["services"]
    assert {"kafka", "topics", "llm", "shunt"} <= set(services)
    shunt = services["shunt"]
    assert shunt["build"]["dockerfile"] == "Dockerfile"
    assert (ROOT / "ops" / shunt["build"]["context"] / "Dockerfile").exists()
    assert set(shunt["secrets"]) <= set(compose()["secrets"])
    assert shunt["environment"]["SHUNT_LLM__BASE_URL"].startswith("http://llm:8089")
    k8s = applied_by_kind()
    deployment, configmap = k8s["Deployment"], k8s["ConfigMap"]
    secret = yaml.safe_load(SECRET_TEMPLATE.read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
    key_ref = next(e for e in container["env"] if e["name"] == "SHUNT_LLM__API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"] and key_ref["key"] in secret["stringData"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    admin_port = int(configmap["data"]["SHUNT_ADMIN__PORT"])
    assert container["ports"][0]["containerPort"] == admin_port
    assert container["image"] == shunt["image"]


def test_dockerfile_entrypoint_runs_a_real_command_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE)
    assert entry is not None
    program, *args = yaml.safe_load(entry.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts
    assert args and args[0] in COMMANDS
    assert "/healthz" in text and "HEALTHCHECK" in text
    assert "EXPOSE 8080" in text and "SHUNT_ADMIN__PORT=8080" in text
    for copied in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        for part in shlex.split(copied):
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    user = image_user()
    uid = numeric_uid(user)
    assert uid is not None, f"USER {user} is a name: the kubelet cannot verify it under runAsNonRoot"
    assert uid != 0
    gid = user.partition(":")[2]
    assert gid.isdigit() and int(gid) != 0, f"USER {user}: give the group as a number too"
    runtime = dockerfile_stages()[-1]
    assert any(i == "RUN" and f"--uid {uid}" in a for i, a in runtime), "the image creates the user it runs as"


def test_dockerfile_copies_what_the_wheel_build_needs() -> None:
    """The build stage copies, under its WORKDIR, everything hatchling reads: pyproject.toml, the readme it
    names, the wheel's packages, and each force-included folder (schemas -> consumer/_schemas, models ->
    consumer/_models); .dockerignore keeps none of them out of the context; the runtime gets the venv."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = ["pyproject.toml", project["project"]["readme"], *wheel["packages"], *wheel["force-include"]]
    assert {"schemas", "models", "consumer"} <= set(needed)
    copies = build_copies()
    workdir = next(a for i, a in reversed(dockerfile_stages()[0]) if i == "WORKDIR")
    for path in needed:
        assert path in copies, f"the build stage does not copy {path}"
        assert copies[path] == str(Path(workdir) / path), f"{path} lands at {copies[path]}, not in the build root"
        assert (ROOT / path).exists()
        assert not dockerignored(path), f".dockerignore keeps {path} out of the build context"
    runtime = dockerfile_stages()[-1]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    assert any(i == "ENV" and "/opt/venv/bin" in a for i, a in runtime)
    assert dockerignored("ops/secrets/llm_api_key"), "local secrets must stay out of the build context"


def test_image_keeps_the_admin_server_on_loopback() -> None:
    """The image does not widen admin.host (default 127.0.0.1); its HEALTHCHECK uses loopback. Kubernetes
    (probes from the kubelet to the pod IP) and compose (a published port) set 0.0.0.0 themselves."""
    assert defaults("admin")["host"] == "127.0.0.1"
    env = " ".join(a for i, a in dockerfile_stages()[-1] if i == "ENV")
    assert "SHUNT_ADMIN__HOST" not in env
    assert "http://127.0.0.1:8080/healthz" in (ROOT / "Dockerfile").read_text()
    assert applied_by_kind()["ConfigMap"]["data"]["SHUNT_ADMIN__HOST"] == "0.0.0.0"
    assert compose()["services"]["shunt"]["environment"]["SHUNT_ADMIN__HOST"] == "0.0.0.0"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    shipped = list(manifests())
    assert {doc["kind"] for _, doc in shipped} == {"ConfigMap", "Deployment", "Job", "Secret"}
    for name, doc in shipped:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is not valid Kubernetes {version}: {exc.message} at {exc.path}")


def test_schema_validation_catches_a_misplaced_field() -> None:
    """strict=True really rejects unknown fields, so the test above is not vacuous."""
    bad = applied_by_kind()["Deployment"]
    bad["spec"]["template"]["spec"]["containers"][0]["runAsUser"] = 10001  # belongs in securityContext
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kubelet_starts_every_container_under_run_as_non_root() -> None:
    checked = 0
    for name, doc in manifests():
        spec = pod_spec(doc)
        if spec is None:
            continue
        assert (spec.get("securityContext") or {}).get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        for container in spec["containers"] + spec.get("initContainers", []):
            refused = kubelet_refuses(spec, container, image_uid_of(container["image"]))
            assert refused is None, f"{name}: the kubelet refuses to start {refused}"
            checked += 1
    assert checked >= 2


def test_deployment_pins_the_image_user_and_hardens_the_container() -> None:
    spec = applied_by_kind()["Deployment"]["spec"]["template"]["spec"]
    pod_ctx = spec["securityContext"]
    user = image_user()
    assert (pod_ctx["runAsUser"], pod_ctx["runAsGroup"]) == tuple(int(n) for n in user.split(":"))
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for doc in applied_by_kind()["Deployment"], applied_by_kind()["Job"]:
        for container in doc["spec"]["template"]["spec"]["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"] == {"drop": ["ALL"]}


def test_kubelet_check_refuses_what_the_old_manifests_shipped() -> None:
    """The check itself: runAsNonRoot with no runAsUser and a named USER (the old `USER shunt`) is refused."""
    spec: dict[str, Any] = {"securityContext": {"runAsNonRoot": True}}
    container: dict[str, Any] = {"name": "shunt", "image": "data-shunt:latest"}
    assert numeric_uid("shunt") is None
    assert kubelet_refuses(spec, container, numeric_uid("shunt")) is not None
    assert kubelet_refuses(spec, container, numeric_uid("0")) is not None
    assert kubelet_refuses(spec, container, numeric_uid("10001:10001")) is None
    spec["securityContext"]["runAsUser"] = 10001
    assert kubelet_refuses(spec, container, None) is None
    assert kubelet_refuses(spec, {**container, "securityContext": {"runAsUser": 0}}, 10001) is not None


def test_the_secret_is_not_in_the_apply_set() -> None:
    for recursive in (False, True):
        for path in apply_set(K8S, recursive=recursive):
            kinds = {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
            assert "Secret" not in kinds, f"kubectl apply -f ops/k8s/ {'-R ' * recursive}would apply {path}"
    assert SECRET_TEMPLATE.suffix not in KUBECTL_EXTENSIONS
    secret = yaml.safe_load(SECRET_TEMPLATE.read_text())
    assert secret["kind"] == "Secret"


def test_readme_gives_the_command_that_creates_the_secret() -> None:
    readme = (K8S / "README.md").read_text()
    container = applied_by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ref = next(e for e in container["env"] if e["name"] == "SHUNT_LLM__API_KEY")["valueFrom"]["secretKeyRef"]
    command = f"kubectl create secret generic {ref['name']} --from-file={ref['key']}="
    assert command in readme, f"ops/k8s/README.md should show `{command}...`"
    assert "kubectl apply -f ops/k8s/" in readme


def test_topics_are_created_before_the_service_starts() -> None:
    """The service refuses to start without its topics: compose runs an init service first, Kubernetes a Job;
    both create every topic the service uses, by the names its configuration gives."""
    topics = {field: name for field, name in defaults("topics").items() if isinstance(name, str)}
    assert set(topics) >= {"input", "output", "dlq", "metrics", "distill"}
    services = compose()["services"]
    assert services["shunt"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = " ".join(services["topics"]["command"])
    assert "--if-not-exists" in script
    for field, name in topics.items():
        assert f"{name}:" in script, f"compose does not create the {field} topic {name}"
        assert services["shunt"]["environment"][f"SHUNT_TOPICS__{field.upper()}"] == name
    job = applied_by_kind()["Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == applied_by_kind()["ConfigMap"]["metadata"]["name"]
    job_script = " ".join(container["args"])
    assert "--if-not-exists" in job_script and "$SHUNT_KAFKA__BOOTSTRAP_SERVERS" in job_script
    configmap = applied_by_kind()["ConfigMap"]["data"]
    for field, name in topics.items():
        env = f"SHUNT_TOPICS__{field.upper()}"
        assert f"${env}:" in job_script, f"the topics Job does not create {env}"
        assert configmap[env] == name


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert str(published).startswith("127.0.0.1:"), f"compose publishes {name}'s {port} on every interface"
    assert "127.0.0.1:8080:8080" in compose()["services"]["shunt"]["ports"]


def test_compose_reads_the_key_from_a_git_ignored_file() -> None:
    spec = compose()
    key_file = (ROOT / "ops" / spec["secrets"]["llm_api_key"]["file"]).resolve()
    assert key_file == COMPOSE_KEY_FILE
    env = spec["services"]["shunt"]["environment"]
    assert env["SHUNT_LLM__API_KEY_FILE"] == "/run/secrets/llm_api_key"
    assert "SHUNT_LLM__API_KEY" not in env
    relative = str(key_file.relative_to(ROOT))
    ignored = subprocess.run(["git", "check-ignore", "-q", relative], cwd=ROOT, check=False)
    assert ignored.returncode == 0, f"{relative} is not git-ignored (or is tracked)"
    tracked = subprocess.run(["git", "ls-files", "--", relative], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not tracked.stdout.strip(), f"{relative} is tracked: `git rm --cached` it"
    assert (COMPOSE_KEY_FILE.parent / "README.md").exists(), "ops/secrets/README.md explains how to create the key"
