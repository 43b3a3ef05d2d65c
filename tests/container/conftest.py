"""The image built and run on a real Docker daemon: `make test-container` only.

tests/container/run.sh starts the daemon, makes the base image and the wheel index, and sets
the CONTAINER_TEST_* variables these tests read. Without them (`make test`) nothing here is
collected, so no test tries to reach a daemon.
"""

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

if "CONTAINER_TEST_DOCKER" not in os.environ:
    collect_ignore_glob = ["test_*.py"]

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = Path(__file__).with_name("compose.override.yml")
PROJECT = "attention-test"
IMAGE = "attention-service:0.1.0"
BOOK = json.loads((ROOT / "tests" / "data" / "book-chapter3-values.json").read_text())


@dataclass
class Docker:
    """The test daemon's CLI (run.sh exported DOCKER_HOST and DOCKER_CONFIG)."""

    cli: str

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        files = ["--file", str(ROOT / "docker-compose.yml"), "--file", str(OVERRIDE)]
        return self.run("compose", "--project-name", PROJECT, *files, *args, timeout=timeout)

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.run("inspect", name).stdout)[0]

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "--all", "--quiet", service).stdout.split()

    def exec(self, container: str, *command: str) -> subprocess.CompletedProcess:
        return self.run("exec", container, *command, check=False)


@pytest.fixture(scope="session")
def docker() -> Docker:
    return Docker(os.environ["CONTAINER_TEST_DOCKER"])


@pytest.fixture(scope="session")
def logs() -> Path:
    return Path(os.environ["CONTAINER_TEST_LOGS"])


@pytest.fixture(scope="session")
def measurements(logs: Path) -> Iterator[dict[str, Any]]:
    """Durations and sizes for docs/container.md, written to the logs folder at the end."""
    found: dict[str, Any] = {}
    yield found
    (logs / "measurements.json").write_text(json.dumps(found, indent=2) + "\n")


@dataclass
class Image:
    id: str
    build_log: str


@pytest.fixture(scope="session")
def image(docker: Docker, logs: Path, measurements: dict[str, Any]) -> Image:
    """The image as `docker compose build` makes it, from a daemon with no build cache."""
    start = time.monotonic()
    result = docker.compose("--progress", "plain", "build", timeout=900)
    measurements["build_s"] = round(time.monotonic() - start, 1)
    build_log = result.stdout + result.stderr
    (logs / "build.log").write_text(build_log)
    info = docker.inspect(IMAGE)
    measurements["image_bytes"] = info["Size"]
    measurements["image_size"] = docker.run(
        "image", "ls", "--format", "{{.Size}}", IMAGE
    ).stdout.strip()
    return Image(info["Id"], build_log)


def wait_healthy(docker: Docker, container: str, timeout: float = 120) -> dict[str, Any]:
    """The container's `docker inspect` once healthy; fails if it exits or turns unhealthy."""
    deadline = time.monotonic() + timeout
    while True:
        state = docker.inspect(container)["State"]
        status = state.get("Health", {}).get("Status")
        if status == "healthy":
            return docker.inspect(container)
        if not state["Running"] or status == "unhealthy":
            log = docker.run("logs", container, check=False)
            pytest.fail(f"{container} is {state['Status']}/{status}:\n{log.stdout}{log.stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"{container} not healthy within {timeout} s: {state}")
        time.sleep(0.25)


def seconds_between(start: str, end: str) -> float:
    """Seconds between two of Docker's RFC 3339 times (nanoseconds cut to microseconds)."""

    def parse(text: str) -> datetime:
        """Docker's times are UTC ("...Z"); Python's isoformat() adds "+00:00"."""
        day, _, rest = text.removesuffix("Z").removesuffix("+00:00").partition("T")
        clock, _, fraction = rest.partition(".")
        return datetime.fromisoformat(f"{day}T{clock}.{(fraction or '0')[:6]:0<6}+00:00")

    return (parse(end) - parse(start)).total_seconds()


def healthy_after_start(info: dict[str, Any]) -> float:
    """Seconds from the container's start to the end of its first passing health probe."""
    passed = [probe for probe in info["State"]["Health"]["Log"] if probe["ExitCode"] == 0]
    return round(seconds_between(info["State"]["StartedAt"], passed[0]["End"]), 1)
