"""The Kubernetes manifests (deploy/kubernetes), checked offline.

Every manifest is validated against the Kubernetes OpenAPI schemas that `kubernetes-validate`
ships in its wheel (strict: an unknown or misspelled field fails), with the network shut. Then
the manifests are held against the app they deploy: the probes' paths are the app's real
liveness and readiness routes and answer as the probes expect, the ports are the image's, the
environment names are real settings with valid values, and the objects point at one another.
"""

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes_validate
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ruamel.yaml import YAML

from service.main import create_app
from service.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
APP_PORT = 8000  # the image's: Dockerfile EXPOSE and CMD --port
GRPC_PORT = Settings.model_fields["grpc_port"].default  # the app's, and the Dockerfile's EXPOSE
# The oldest Kubernetes release still commonly run, and the newest the schemas cover.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(path.read_text()) if doc]


def resources() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load(path)
    ]


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    (found,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in base units: '768Mi' -> bytes, '500m' -> 0.5."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    number, unit = match.groups()
    return float(number) * units.get(unit, 1)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the validation tried to reach the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- the schemas ----------------------------------------------------------------------------------


def test_the_manifests_are_all_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in resources())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("name", "resource"), resources(), ids=[f"{n}:{d['kind']}" for n, d in resources()]
)
def test_each_manifest_is_valid_for_kubernetes(no_network, name, resource, version) -> None:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = "/".join(str(part) for part in error.path)
        pytest.fail(f"{name}: {where}: {error.message}")


def test_the_validator_catches_a_misspelled_field(no_network) -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessProbes"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load(MANIFESTS / "kustomization.yaml")
    listed = sorted(kustomization["resources"])
    present = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert listed == present


# --- the objects point at one another -------------------------------------------------------------


def pod_labels() -> dict[str, str]:
    return one("Deployment")["spec"]["template"]["metadata"]["labels"]


def test_selectors_match_the_pods() -> None:
    deployment = one("Deployment")
    labels = pod_labels()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("Service")["spec"]["selector"].items() <= labels.items()
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_hpa_scales_the_deployment_on_cpu() -> None:
    hpa, deployment = one("HorizontalPodAutoscaler")["spec"], one("Deployment")
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert [metric["resource"]["name"] for metric in hpa["metrics"]] == ["cpu"]
    assert 1 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    # Utilization is measured against the request: the container must have one.
    assert quantity(container()["resources"]["requests"]["cpu"]) > 0


def test_the_pdb_leaves_a_replica_serving() -> None:
    pdb = one("PodDisruptionBudget")["spec"]
    minimum = one("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "maxUnavailable" in pdb:
        assert pdb["maxUnavailable"] < minimum
    else:
        assert pdb["minAvailable"] < minimum


def test_ports_are_the_images() -> None:
    ports = {port["name"]: port for port in container()["ports"]}
    assert {name: port["containerPort"] for name, port in ports.items()} == {
        "http": APP_PORT,
        "grpc": GRPC_PORT,
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {APP_PORT} {GRPC_PORT}$", dockerfile, re.MULTILINE)
    assert f'"--port", "{APP_PORT}"' in dockerfile
    assert re.search(r"^ENV ATTENTION_GRPC_HOST=0\.0\.0\.0$", dockerfile, re.MULTILINE)
    service_ports = {port["name"]: port for port in one("Service")["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc"}
    for name, service_port in service_ports.items():
        assert service_port["targetPort"] in (name, ports[name]["containerPort"])
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    annotations = one("Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert annotations["prometheus.io/port"] == str(APP_PORT)


def test_the_image_is_the_one_compose_builds() -> None:
    compose = YAML(typ="safe", pure=True).load((ROOT / "docker-compose.yml").read_text())
    assert container()["image"] == compose["services"]["attention"]["image"]


# --- probes: the app's real routes, answering as the probes expect --------------------------------


def probe_path(name: str) -> str:
    probe = container()[name]["httpGet"]
    assert probe["port"] in ("http", APP_PORT), probe
    return probe["path"]


def test_startup_and_readiness_probe_the_apps_routes_and_liveness_its_grpc_health() -> None:
    assert probe_path("startupProbe") == "/healthz"
    assert probe_path("readinessProbe") == "/readyz"
    assert container()["livenessProbe"]["grpc"] == {"port": GRPC_PORT, "service": ""}
    paths = create_app(Settings()).openapi()["paths"]
    routes = {path for path, operations in paths.items() if "get" in operations}
    for name in ["startupProbe", "readinessProbe"]:
        assert probe_path(name) in routes, name
    annotations = one("Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/path" in annotations:
        assert annotations["prometheus.io/path"] in routes


async def test_the_probes_answer_as_kubernetes_expects() -> None:
    """Startup and liveness pass from the start; readiness only once the lifespan has warmed
    up. Kubernetes' gRPC probe passes on SERVING alone."""
    grpc_port = free_port()
    app = create_app(Settings(grpc_port=grpc_port))
    probe = container()["livenessProbe"]["grpc"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://pod"
    ) as client:
        assert (await client.get(probe_path("startupProbe"))).status_code == 200
        assert (await client.get(probe_path("readinessProbe"))).status_code >= 400
        async with app.router.lifespan_context(app):
            # The warm-up runs behind the open port: readiness follows once it is done.
            for _ in range(1200):
                if (await client.get(probe_path("readinessProbe"))).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            for name in ["startupProbe", "readinessProbe"]:
                response = await client.get(probe_path(name))
                assert 200 <= response.status_code < 400, (name, response.text)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                check = health_pb2.HealthCheckRequest(service=probe["service"])
                answer = await health_pb2_grpc.HealthStub(channel).Check(check)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


# --- settings -------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    """The container's environment: the ConfigMap it loads, then its own `env`."""
    configmap = one("ConfigMap")
    refs = [source["configMapRef"]["name"] for source in container().get("envFrom", [])]
    assert refs == [configmap["metadata"]["name"]]
    env = dict(configmap["data"])
    env |= {item["name"]: item["value"] for item in container().get("env", [])}
    return env


def test_environment_names_are_real_settings() -> None:
    names = environment()
    assert names
    for name in names:
        assert name.startswith("ATTENTION_"), name
        assert name.removeprefix("ATTENTION_").lower() in Settings.model_fields, name


def test_environment_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment()
    for name, value in env.items():
        assert isinstance(value, str), f"{name}: ConfigMap values are strings; quote {value!r}"
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises on a value the service would refuse at start-up
    cpu_limit = quantity(container()["resources"]["limits"]["cpu"])
    assert 1 <= settings.torch_threads <= cpu_limit, "one torch thread per core of the limit"


# --- resources and security -----------------------------------------------------------------------


def test_resources_are_sized_from_the_measured_memory() -> None:
    resources_ = container()["resources"]
    for kind in ["cpu", "memory"]:
        assert quantity(resources_["requests"][kind]) <= quantity(resources_["limits"][kind]), kind
    # The limit covers the measured worst case, noted in the manifest, with headroom.
    text = (MANIFESTS / "deployment.yaml").read_text()
    peaks = [float(mib) for mib in re.findall(r"peak (\d+) MiB", text)]
    assert peaks, "deployment.yaml notes the measured peaks"
    assert quantity(resources_["limits"]["memory"]) >= 1.2 * max(peaks) * 2**20
    assert quantity(resources_["requests"]["memory"]) >= 1.1 * min(peaks) * 2**20


def test_the_pod_runs_unprivileged_on_a_read_only_root() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    (image_user,) = re.findall(r"^USER (\d+)", dockerfile, re.MULTILINE)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(image_user)
    assert pod.get("automountServiceAccountToken") is False
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The one writable path: /tmp, from an emptyDir, as compose's tmpfs.
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
