"""Start-up as an orchestrator reads it: the port opens at once, `/healthz` is 200 while the
service warms up and `/readyz` 503 until the encoding and default tables are loaded, then 200.

The real server is started (uvicorn, 127.0.0.1) with its warm-up held by the test itself
(tests/slow_start.py), so the not-yet-ready window is certain, not a race against a fast
machine. A failed warm-up and a stop are checked in process, through the app's lifespan.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.main import create_app
from service.settings import Settings
from tests.conftest import BOOK, free_port, stop

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60  # importing torch, on a busy 2-core machine
READY_TIMEOUT_S = 60  # the GPT-2 encoding and a 50257 x 256 table, after the gate opens
NOT_READY = {"detail": "loading the encoding and embedding tables"}


def get(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    def __init__(self, process: subprocess.Popen, base_url: str, gate: Path, log: Path):
        self.process, self.base_url, self.gate, self.log = process, base_url, gate, log

    def get(self, path: str) -> tuple[int, dict]:
        return get(self.base_url + path)

    def wait_for_port(self) -> float:
        """Seconds until a connection is accepted; fails if the process exits first."""
        start = time.monotonic()
        while True:
            assert self.process.poll() is None, f"the server exited:\n{self.log.read_text()}"
            assert time.monotonic() - start < START_TIMEOUT_S, self.log.read_text()
            try:
                socket.create_connection(
                    ("127.0.0.1", int(self.base_url.rsplit(":", 1)[1])), 1
                ).close()
                return time.monotonic() - start
            except OSError:
                time.sleep(0.05)

    def wait_until_ready(self) -> tuple[int, dict]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if status == 200:
                return status, body
            assert (status, body) == (503, NOT_READY), body
            time.sleep(0.1)
        pytest.fail(f"/readyz never answered 200:\n{self.log.read_text()}")


@pytest.fixture
def held_server(tmp_path: Path) -> Iterator[Server]:
    """The real server, its warm-up waiting for `server.gate` to exist."""
    port, gate, log = free_port(), tmp_path / "gate", tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.slow_start", "--port", str(port), "--gate", str(gate)],
            cwd=ROOT,
            env={**os.environ, "ATTENTION_ACCESS_LOG": "false"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Server(process, f"http://127.0.0.1:{port}", gate, log)
    finally:
        gate.touch()  # a held warm-up would otherwise keep the interpreter from exiting
        stop(process)


def test_the_port_opens_before_the_warm_up_and_readyz_says_when_it_is_done(held_server):
    held_server.wait_for_port()

    # The warm-up has not started: it waits for the gate, which only this test opens.
    assert held_server.get("/healthz") == (200, {"status": "ok"})
    assert held_server.get("/readyz") == (503, NOT_READY)
    assert held_server.get("/readyz") == (503, NOT_READY), "still not ready: nothing changed"

    held_server.gate.touch()

    assert held_server.wait_until_ready() == (200, {"status": "ready"})
    assert held_server.get("/healthz") == (200, {"status": "ok"})


def test_requests_before_readiness_are_served(held_server):
    held_server.wait_for_port()
    body = json.dumps({"embeddings": BOOK["inputs"], "d_out": 2, "seed": 789}).encode()
    request = urllib.request.Request(
        f"{held_server.base_url}/attention/self-attention",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    with opener.open(request, timeout=30) as response:
        answer = json.loads(response.read())

    assert held_server.get("/readyz") == (503, NOT_READY)  # the answer did not need the warm-up
    assert [round(x, 4) for x in answer["context_vectors"][1]] == [-0.0748, 0.0703]  # book 3.4


def test_sigterm_while_warming_up_stops_the_server(held_server):
    held_server.wait_for_port()
    assert held_server.get("/readyz") == (503, NOT_READY)

    held_server.process.send_signal(signal.SIGTERM)
    held_server.gate.touch()  # the warm-up's thread runs to its end; the process then exits

    # uvicorn shuts down gracefully, then raises the signal it caught again, so that the exit
    # status says what stopped it.
    assert held_server.process.wait(60) in (0, -signal.SIGTERM)
    assert "Finished server process" in held_server.log.read_text()


# --- in process: the lifespan -------------------------------------------------------------------


async def readiness(client: httpx.AsyncClient) -> tuple[tuple[int, dict], tuple[int, dict]]:
    health, ready = await client.get("/healthz"), await client.get("/readyz")
    return (health.status_code, health.json()), (ready.status_code, ready.json())


async def wait_while_loading(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (await client.get("/readyz")).json() == NOT_READY:
        assert time.monotonic() < deadline, "the warm-up never ended"
        await asyncio.sleep(0.05)


async def test_readyz_is_503_before_the_lifespan_and_after_it():
    app = create_app(Settings())
    transport = httpx.ASGITransport(app=app)  # which runs no lifespan of its own
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        before = await readiness(client)
        async with app.router.lifespan_context(app):
            await wait_while_loading(client)
            during = await readiness(client)
        after = await readiness(client)

    assert before == ((200, {"status": "ok"}), (503, NOT_READY))
    assert during == ((200, {"status": "ok"}), (200, {"status": "ready"}))
    assert after == ((200, {"status": "ok"}), (503, NOT_READY))


async def test_a_failed_warm_up_fails_liveness_too_and_says_why():
    grpc_port = free_port()
    app = create_app(Settings(grpc_port=grpc_port))

    def broken() -> None:
        raise FileNotFoundError("vocab.bpe")

    app.state.engine.warm_up = broken
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        app.router.lifespan_context(app),
    ):
        await wait_while_loading(client)
        health, ready = await readiness(client)
        protocol_live = await client.get("/v2/health/live")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            checks = [
                (
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service)
                    )
                ).status
                for service in ("", "inference.GRPCInferenceService")
            ]
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            grpc_live = (await stub.ServerLive(pb.ServerLiveRequest())).live

    # A process that can never be ready is restarted by its orchestrator, as one that exited:
    # whichever of its health endpoints the orchestrator asks.
    failure = "FileNotFoundError: vocab.bpe"
    assert health == (503, {"detail": f"the warm-up failed ({failure}): restart"})
    assert ready == (503, {"detail": f"the warm-up failed ({failure})"})
    assert (protocol_live.status_code, protocol_live.json()) == (400, {"live": False})
    assert checks == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert grpc_live is False
