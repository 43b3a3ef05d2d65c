"""The scale-out: `docker compose --profile scale up --scale attention-replica=2 lb`.

nginx with deploy/nginx/nginx.conf, from the test's own image of Debian's nginx package (no
registry can be reached here), in front of two replicas on an internal bridge network: Docker's
DNS names the replicas, and the requests go from inside the lb container, so no packet leaves
the network namespaces the test made.
"""

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.container.conftest import BOOK, PROJECT, ROOT, Docker, Image, wait_healthy

NGINX_IMAGE = "attention-test/nginx-debian:bookworm"  # not nginx's official image: say so
NGINX_DOCKERFILE = Path(__file__).with_name("nginx.Dockerfile")
REPLICAS = 2
REQUESTS = 8
NETWORK = f"{PROJECT}_default"
BOOK_3_4 = next(example for example in BOOK["examples"] if example["name"].endswith("seed 789"))


@dataclass
class ScaleOut:
    lb: str
    replicas: list[str]


@pytest.fixture(scope="module")
def nginx_image(docker: Docker) -> str:
    sources = os.environ["CONTAINER_TEST_APT_SOURCES"]
    docker.run(
        "build", "--network", "host", "--tag", NGINX_IMAGE, "--file", str(NGINX_DOCKERFILE),
        "--secret", f"id=apt-sources,src={sources}", str(NGINX_DOCKERFILE.parent),
        timeout=600,
    )  # fmt: skip
    return NGINX_IMAGE


@pytest.fixture(scope="module")
def scale_out(
    docker: Docker, image: Image, nginx_image: str, measurements: dict[str, Any]
) -> Iterator[ScaleOut]:
    scale = ["--profile", "scale"]
    start = time.monotonic()
    try:
        # --detach waits for the replicas to be healthy (lb depends on it), then starts lb.
        docker.compose(*scale, "up", "--detach", "--scale", f"attention-replica={REPLICAS}", "lb")
        (lb,) = docker.containers("lb")
        wait_healthy(docker, lb)
        measurements["scale_out_up_s"] = round(time.monotonic() - start, 1)
        yield ScaleOut(lb, docker.containers("attention-replica"))
    finally:
        docker.compose(*scale, "down", "--timeout", "10")
    assert docker.run("network", "ls", "--quiet", "--filter", f"name={NETWORK}").stdout == ""


def in_lb(docker: Docker, scale_out: ScaleOut, script: str) -> str:
    result = docker.exec(scale_out.lb, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_lb_is_the_tests_nginx_with_the_projects_conf(docker: Docker, scale_out: ScaleOut) -> None:
    info = docker.inspect(scale_out.lb)
    assert info["Config"]["Image"] == NGINX_IMAGE
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    conf = in_lb(docker, scale_out, "cat /etc/nginx/nginx.conf")
    assert conf == (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    uid = in_lb(docker, scale_out, "id -u").strip()
    assert uid == "101"


def test_the_network_is_internal(docker: Docker, scale_out: ScaleOut) -> None:
    network = json.loads(docker.run("network", "inspect", NETWORK).stdout)[0]
    assert network["Internal"] is True
    attached = {container["Name"] for container in network["Containers"].values()}
    assert len(attached) == REPLICAS + 1
    for replica in scale_out.replicas:
        info = docker.inspect(replica)
        assert info["HostConfig"]["PortBindings"] in ({}, None)
        assert set(info["NetworkSettings"]["Networks"]) == {NETWORK}


def test_the_replicas_run_the_one_image(docker: Docker, image: Image, scale_out: ScaleOut) -> None:
    assert len(scale_out.replicas) == REPLICAS
    for replica in scale_out.replicas:
        info = docker.inspect(replica)
        assert info["Image"] == image.id
        assert info["State"]["Health"]["Status"] == "healthy"
        environment = dict(variable.split("=", 1) for variable in info["Config"]["Env"])
        assert environment["ATTENTION_TORCH_THREADS"] == "1"


def test_nginx_spreads_the_requests_over_the_replicas(
    docker: Docker, scale_out: ScaleOut, measurements: dict[str, Any]
) -> None:
    ready = in_lb(docker, scale_out, "wget -q -O - http://127.0.0.1:8080/readyz")
    assert json.loads(ready) == {"status": "ready"}
    request = json.dumps(dict(BOOK_3_4["request"], embeddings=BOOK["inputs"]))
    # One request at a time: least_conn then sees no connection anywhere and takes turns.
    answers = in_lb(
        docker,
        scale_out,
        f"for i in $(seq 1 {REQUESTS}); do "
        f"wget -q -O - --header 'Content-Type: application/json' "
        f"--header \"X-Request-ID: spread-$i\" --post-data '{request}' "
        f"http://127.0.0.1:8080/attention/self-attention; echo; done",
    )
    bodies = [json.loads(line) for line in answers.splitlines() if line]
    assert len(bodies) == REQUESTS
    for body in bodies:
        np.testing.assert_allclose(
            body["context_vectors"], BOOK_3_4["context_vectors"], rtol=0, atol=1e-4
        )
    expected = {f"spread-{i}" for i in range(1, REQUESTS + 1)}
    # Each replica writes its request lines within 50 ms of the request (README, Operations).
    asked = time.monotonic()
    while (served := request_ids(docker, scale_out.replicas)) and time.monotonic() < asked + 3:
        if set().union(*served.values()) == expected:
            break
        time.sleep(0.2)
    measurements["request_lines_logged_after_s"] = round(time.monotonic() - asked, 2)
    counted = sorted(request_id for ids in served.values() for request_id in ids)
    assert counted == sorted(expected), served
    assert all(served.values()), f"a replica served nothing: {served}"


def request_ids(docker: Docker, replicas: list[str]) -> dict[str, set[str]]:
    """The spread-* request ids in each replica's access log."""
    served = {}
    for replica in replicas:
        result = docker.run("logs", replica)
        lines = result.stdout.splitlines() + result.stderr.splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        served[replica] = {
            record["request_id"]
            for record in records
            if record.get("request_id", "").startswith("spread-")
        }
    return served


def test_the_logs_are_free_of_warnings(docker: Docker, scale_out: ScaleOut) -> None:
    for container in [scale_out.lb, *scale_out.replicas]:
        result = docker.run("logs", container)
        for line in (result.stdout + result.stderr).splitlines():
            if line.startswith("{"):
                assert json.loads(line)["level"] == "info", line
            else:
                assert line.startswith("INFO:     "), f"{container}: {line}"


def test_the_daemon_found_nothing_deprecated(logs: Path, scale_out: ScaleOut) -> None:
    """What dockerd said of the requests it served (the compose file's options, say), not of its
    own start (Debian's dockerd writes its containerd a config in a deprecated version)."""
    _, listening, text = (logs / "dockerd.log").read_text().partition("API listen on")
    assert listening, "no `API listen on` line in dockerd's log"
    deprecated = [line for line in text.splitlines() if "deprecated" in line.lower()]
    assert not deprecated, "\n".join(deprecated)
