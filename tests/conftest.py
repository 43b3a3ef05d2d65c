import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.main import create_app
from service.settings import Settings

# Apps made here open no gRPC port: the tests of the gRPC service start their own.
os.environ.setdefault("ATTENTION_GRPC_PORT", "0")

BOOK = json.loads((Path(__file__).parent / "data" / "book-chapter3-values.json").read_text())


def book_input(name: str) -> list[Any]:
    """The book's named inputs: "inputs" (6 x 3) or "batch" (2 x 6 x 3)."""
    return BOOK["inputs"] if name == "inputs" else [BOOK["inputs"], BOOK["inputs"]]


@pytest.fixture(scope="session")
def app():
    return create_app(Settings())


@pytest.fixture(scope="session")
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        yield client


def make_client(settings: Settings) -> httpx.AsyncClient:
    """A client of an app with other settings (smaller limits, say)."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://testserver"
    )


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus exposition (0 when absent), by name and all labels."""
    wanted = re.escape(",".join(f'{key}="{value}"' for key, value in labels.items()))
    pattern = rf"^{name}\{{{wanted}\}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """A server this test started, stopped as an orchestrator would: SIGTERM, then a kill if
    it has not exited within 30 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def live_server(**env: str) -> Iterator[str]:
    """The service as `make run` starts it (uvicorn, its lifespan), on a free loopback port,
    with these ATTENTION_ settings; yields its address, `127.0.0.1:PORT`, once ready."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    settings = {f"ATTENTION_{name.upper()}": value for name, value in env.items()}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, "ATTENTION_ACCESS_LOG": "false", **settings},
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server did not become ready:\n{log.read().decode()[-4000:]}")
                time.sleep(0.1)
            yield f"127.0.0.1:{port}"
        finally:
            stop(process)
