"""The image, built by `docker compose build` and run by `docker compose up attention`.

The build reads its indexes from secrets (tests/container/compose.override.yml): every wheel from
the test's index on 127.0.0.1. The service runs on the host's network, read-only and with every
capability dropped, as docker-compose.yml says, and is checked over HTTP on 127.0.0.1:8000.
"""

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from tests.container.conftest import (
    BOOK,
    IMAGE,
    ROOT,
    Docker,
    Image,
    healthy_after_start,
    seconds_between,
    wait_healthy,
)

BASE_URL = "http://127.0.0.1:8000"
UID = 10001
ATOL = 1e-4  # the book prints 4 decimals


def http(path: str, body: Any = None, timeout: float = 30) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a POST of `body` as JSON; no proxy."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        BASE_URL + path, data=data, headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read()


def in_image(docker: Docker, *command: str) -> str:
    """Run a command in a throwaway container of the image, with no network."""
    return docker.run("run", "--rm", "--network", "none", IMAGE, *command).stdout


# --- the build ----------------------------------------------------------------------------------


def test_every_package_came_from_the_index_the_secret_names(docker: Docker, image: Image) -> None:
    listed = json.loads(in_image(docker, "python", "-m", "pip", "list", "--format", "json"))
    installed = {re.sub(r"[-_.]+", "-", package["name"]).lower() for package in listed}
    served = re.findall(r'"GET /simple/([^/]+)/([^ ]+) HTTP/1\.1" 200', index_log())
    served_names = {name for name, _ in served}
    # pip (and setuptools) in the venv come with Debian's python3-venv; the project is the context.
    assert installed - served_names == {"pip", "attention-service"}
    assert "setuptools" in served_names, "the build backend came from elsewhere"
    (torch,) = [file for name, file in served if name == "torch"]
    assert "%2Bcpu-cp311" in torch, torch


def index_log() -> str:
    with open(os.environ["CONTAINER_TEST_INDEX_LOG"]) as log:
        return log.read()


def test_no_index_or_secret_is_left_in_the_image(docker: Docker, image: Image) -> None:
    token = os.environ["CONTAINER_TEST_SECRET_TOKEN"]  # in the pip.conf and apt sources secrets
    index = f"127.0.0.1:{os.environ['CONTAINER_TEST_INDEX_PORT']}"
    history = docker.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    config = json.dumps(docker.inspect(IMAGE))
    for where, text in [("history", history), ("image config", config)]:
        assert token not in text, where
        assert index not in text, where
    found = in_image(
        docker,
        "sh",
        "-c",
        f"ls /etc/pip.conf 2>&1; grep -rlF {token} /etc /opt /app /home /root /srv || true",
    )
    assert found.strip() == "ls: cannot access '/etc/pip.conf': No such file or directory"
    sources = in_image(docker, "cat", "/etc/apt/sources.list.d/debian.sources")
    base = docker.run(
        "run", "--rm", "--network", "none", "debian:bookworm-slim",
        "cat", "/etc/apt/sources.list.d/debian.sources",
    ).stdout  # fmt: skip
    assert sources == base


def test_the_build_log_is_free_of_warnings(image: Image) -> None:
    """What the Dockerfile's steps print (BuildKit's "#N" lines), not what compose says."""
    noisy = [
        line
        for line in image.build_log.splitlines()
        if re.match(r"#\d+ ", line) and re.search(r"warn|deprecat|error", line, re.IGNORECASE)
    ]
    assert not noisy, "\n".join(noisy)


def test_the_base_is_debian_12_and_its_python_in_a_venv(docker: Docker, image: Image) -> None:
    probe = "import sys, platform; print(sys.prefix, platform.python_version())"
    assert in_image(docker, "cat", "/etc/debian_version").startswith("12.")
    prefix, version = in_image(docker, "python", "-c", probe).split()
    assert prefix == "/opt/venv"
    assert version.startswith("3.11."), version


def test_the_code_is_the_installed_one_run_from_an_empty_directory(
    docker: Docker, image: Image
) -> None:
    probe = "import attention, service.main; print(attention.__file__, service.main.__file__)"
    for path in in_image(docker, "python", "-c", probe).split():
        assert path.startswith("/opt/venv/lib/python3.11/site-packages/"), path
    assert in_image(docker, "sh", "-c", "pwd; ls -A") == "/srv\n"


def test_one_build_serves_both_services(docker: Docker, image: Image) -> None:
    """`attention-replica` runs the image `attention` builds: no second build, no dangling one."""
    docker.compose("--profile", "scale", "build", timeout=600)
    assert docker.run("image", "ls", "--quiet", "attention-service").stdout.split() == [
        image.id.removeprefix("sha256:")[:12]
    ]
    assert docker.run("image", "ls", "--quiet", "--filter", "dangling=true").stdout == ""


# --- the service, as `docker compose up attention` runs it ----------------------------------------


@dataclass
class Service:
    container: str
    info: dict[str, Any]


@pytest.fixture(scope="module")
def service(docker: Docker, image: Image, measurements: dict[str, Any]) -> Iterator[Service]:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", 8000))
        except OSError as error:
            pytest.fail(f"port 8000 is taken here, and the service needs it: {error}")
    docker.compose("up", "--detach", "attention")
    try:
        (container,) = docker.containers("attention")
        ready_after = wait_ready(docker, container)
        info = wait_healthy(docker, container)
        measurements["ready_after_start_s"] = ready_after
        measurements["healthy_after_start_s"] = healthy_after_start(info)
        yield Service(container, info)
    finally:
        docker.compose("down", "--timeout", "10")


def wait_ready(docker: Docker, container: str, timeout: float = 120) -> float:
    """Seconds from the container's start to its first 200 from /readyz, polled every 0.1 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("/readyz", timeout=1)[0] == 200:
                now = datetime.now(UTC).isoformat()
                started = docker.inspect(container)["State"]["StartedAt"]
                return round(seconds_between(started, now), 1)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    pytest.fail(f"/readyz never answered 200 in {timeout} s")


def test_readyz(service: Service) -> None:
    status, content_type, body = http("/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    assert content_type.startswith("application/json")


@pytest.mark.parametrize(
    "example",
    [example for example in BOOK["examples"] if example["name"].startswith("3.4")],
    ids=lambda example: example["name"],
)
def test_the_books_section_3_4_numbers(service: Service, example: dict[str, Any]) -> None:
    request = dict(example["request"], embeddings=BOOK["inputs"])
    status, _, body = http(f"/attention/{example['variant']}", request)
    assert status == 200, body
    answer = json.loads(body)
    for key in ["attention_weights", "context_vectors"]:
        np.testing.assert_allclose(answer[key], example[key], rtol=0, atol=ATOL, err_msg=key)


def test_the_inference_protocol_over_grpc_on_8001(service: Service) -> None:
    """The image exposes the gRPC port and listens on every interface: the book's section 3.4
    numbers through tritonclient.grpc, and the health service Kubernetes' probes ask."""
    import grpc
    import tritonclient.grpc as triton
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel("127.0.0.1:8001") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
    example = next(e for e in BOOK["examples"] if e["name"].startswith("3.4"))
    client = triton.InferenceServerClient("127.0.0.1:8001")
    tensor = triton.InferInput("embeddings", [6, 3], "FP32")
    tensor.set_data_from_numpy(np.asarray(BOOK["inputs"], dtype=np.float32))
    parameters = {key: value for key, value in example["request"].items() if key != "embeddings"}
    result = client.infer(example["variant"], [tensor], parameters=parameters)
    client.close()
    for key in ["attention_weights", "context_vectors"]:
        np.testing.assert_allclose(result.as_numpy(key), example[key], rtol=0, atol=ATOL)


def test_a_text_request_is_tokenized_offline(service: Service) -> None:
    text, ids = BOOK["gpt2_tokens"]["text"], BOOK["gpt2_tokens"]["ids"]
    status, _, body = http("/attention/simplified", {"text": text})
    assert status == 200, body
    tokens = json.loads(body)["tokens"]
    assert [token["id"] for token in tokens] == ids
    assert "".join(token["text"] for token in tokens) == text


def test_docs_and_their_assets_are_served_offline(service: Service) -> None:
    status, content_type, body = http("/docs")
    page = body.decode()
    assert (status, content_type.split(";")[0]) == (200, "text/html")
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert any("swagger-ui" in asset for asset in assets), page
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), f"remote asset {asset}"
        assert http(asset)[0] == 200, asset


def test_metrics_count_the_requests(service: Service) -> None:
    book = {"embeddings": BOOK["inputs"], "d_out": 2, "seed": 789}
    for _ in range(3):
        assert http("/attention/self-attention", book)[0] == 200
    status, content_type, body = http("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    sample = re.search(
        r'^attention_http_requests_total\{method="POST",route="/attention/self-attention",'
        r'status="200"\} (\S+)$',
        body.decode(),
        re.MULTILINE,
    )
    assert sample and float(sample.group(1)) >= 3, body.decode()


def test_healthy_means_ready(docker: Docker, service: Service) -> None:
    healthcheck = service.info["Config"]["Healthcheck"]
    assert healthcheck == docker.inspect(IMAGE)["Config"]["Healthcheck"], "compose = Dockerfile"
    assert healthcheck["Test"][-1].endswith("urlopen('http://127.0.0.1:8000/readyz', timeout=2)")
    assert service.info["State"]["Health"]["Status"] == "healthy"
    assert service.info["State"]["Health"]["FailingStreak"] == 0
    # Probes come every interval from the start; the first that passes makes it healthy, well
    # inside the start period, in which a failing probe does not count.
    assert healthy_after_start(service.info) * 1e9 < healthcheck["StartPeriod"]


def process_status(docker: Docker, container: str) -> dict[str, str]:
    """/proc/1/status of the container: the service's own process."""
    result = docker.exec(container, "cat", "/proc/1/status")
    assert result.returncode == 0, result.stderr
    return dict(line.split(":\t", 1) for line in result.stdout.splitlines())


def test_read_only_root_without_a_tmpfs(docker: Docker, service: Service) -> None:
    host_config = service.info["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert not host_config.get("Tmpfs") and not host_config.get("Binds")
    assert service.info["Mounts"] == []
    probe = (
        "import errno\n"
        "for path in ['/tmp/x', '/srv/x', '/home/app/x', '/opt/venv/x']:\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as error:\n"
        "        assert error.errno == errno.EROFS, (path, error)\n"
        "    else:\n"
        "        raise AssertionError(path + ' is writable')\n"
    )
    result = docker.exec(service.container, "python", "-c", probe)
    assert result.returncode == 0, result.stderr


def test_runs_as_its_own_user_with_no_capabilities(docker: Docker, service: Service) -> None:
    status = process_status(docker, service.container)
    assert status["Uid"].split() == [str(UID)] * 4
    assert status["Gid"].split() == [str(UID)] * 4
    for capabilities in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]:
        assert int(status[capabilities], 16) == 0, capabilities
    assert status["NoNewPrivs"].strip() == "1"
    assert service.info["HostConfig"]["CapDrop"] == ["ALL"]
    account = docker.exec(service.container, "getent", "passwd", "app").stdout.strip()
    assert account == f"app:x:{UID}:{UID}::/home/app:/usr/sbin/nologin"
    home = docker.exec(service.container, "stat", "-c", "%u %F", "/home/app").stdout.strip()
    assert home == f"{UID} directory"


def test_stops_gracefully_with_exit_code_0_and_clean_logs(docker: Docker, service: Service) -> None:
    docker.compose("stop", "--timeout", "10", "attention")
    state = docker.inspect(service.container)["State"]
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    result = docker.run("logs", service.container)
    lines = (result.stdout + result.stderr).splitlines()
    assert "INFO:     Finished server process [1]" in lines
    for line in lines:
        if line.startswith("{"):
            assert json.loads(line)["level"] == "info", line
        else:
            assert line.startswith("INFO:     "), line


def test_the_compose_file_is_the_shipped_one() -> None:
    """The override adds the test's own parts; the service's settings are docker-compose.yml's."""
    override = (ROOT / "tests" / "container" / "compose.override.yml").read_text()
    for key in ["read_only", "cap_drop", "security_opt", "healthcheck", "environment", "user"]:
        assert f"{key}:" not in override, key
