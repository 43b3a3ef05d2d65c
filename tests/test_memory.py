"""Memory handed back when idle (service.memory): when the release runs, and what it drops."""

import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import orjson
import pytest

from service import memory, parsing, pipeline
from service.memory import IdleRelease


def test_the_release_runs_once_the_last_piece_of_work_has_ended_and_not_before():
    released = threading.Event()
    idle = IdleRelease(0.05, released.set)
    with idle.work():
        with idle.work():
            pass
        time.sleep(0.2)  # one piece ended, another still runs
        assert not released.is_set()
    assert released.wait(5)


def test_work_begun_within_the_idle_period_postpones_the_release():
    releases: list[float] = []
    idle = IdleRelease(0.3, lambda: releases.append(time.monotonic()))
    with idle.work():
        pass
    time.sleep(0.1)
    with idle.work():
        ended = time.monotonic()
    deadline = time.monotonic() + 5
    while not releases and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(releases) == 1
    assert releases[0] - ended >= 0.3  # counted from the end of the second piece of work


def test_a_failing_release_leaves_the_next_idle_period_its_own():
    calls: list[int] = []
    second = threading.Event()

    def action() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first release fails")
        second.set()

    idle = IdleRelease(0.01, action)
    with idle.work():
        pass
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    with idle.work():
        pass
    assert second.wait(5)


@pytest.fixture
def body() -> bytes:
    return orjson.dumps({"embeddings": [[float(i), 2.0] for i in range(100)]})


def test_the_kept_parser_is_dropped_only_once_unused_for_the_given_time(body):
    parsing.fast_values(body)
    (kept,) = parsing._idle_parsers

    parsing.drop_idle_parsers(60)  # used just now
    assert parsing._idle_parsers == [kept]

    parsing.drop_idle_parsers(0)
    assert parsing._idle_parsers == []
    parsing.fast_values(body)  # a new one is made, and kept
    assert len(parsing._idle_parsers) == 1


def test_the_release_drops_an_idle_parser_and_trims(monkeypatch, body):
    parsing.fast_values(body)
    monkeypatch.setattr(memory, "IDLE_SECONDS", 0)
    memory.release()
    assert parsing._idle_parsers == []


def test_on_glibc_malloc_is_configured():
    if memory.glibc() is None:
        pytest.skip("not glibc: there is nothing to configure")
    assert memory.configure_malloc()


class TrackedBody(bytearray):
    """A body whose lifetime a test can follow (a bytearray takes no weak reference)."""


LARGE_ROWS = np.random.default_rng(3).standard_normal((400, 32)).round(6).tolist()
LARGE_BODIES = {  # each over the pipeline's INLINE_BODY_BYTES, so parsed on a worker thread
    "/attention/causal": {"embeddings": LARGE_ROWS, "d_out": 4},
    "/attention/compare": {"embeddings": LARGE_ROWS, "d_out": 4},
    "/v2/models/causal/infer": {
        "inputs": [
            {
                "name": "embeddings",
                "shape": [400, 32],
                "datatype": "FP32",
                "data": [x for row in LARGE_ROWS for x in row],
            }
        ],
        "parameters": {"d_out": 4},
    },
}


@pytest.mark.parametrize("path", list(LARGE_BODIES))
async def test_a_large_body_is_freed_before_the_computation(client, app, monkeypatch, path):
    """Once decoded, the body (62 MB for the bench's long input) is no longer held by anyone
    while the answer is computed: the adapter hands it to the pipeline and keeps no reference."""
    from service.routes import attention, compare, inference_protocol

    bodies: list[weakref.ref] = []

    async def tracked_read_body(request, limit):
        body = TrackedBody(await real_read_body(request, limit))
        bodies.append(weakref.ref(body))
        return body

    real_read_body = attention.read_body
    for module in (attention, compare, inference_protocol):
        monkeypatch.setattr(module, "read_body", tracked_read_body)
    alive_while_computing: list[bool] = []
    engine = app.state.engine
    real_payload = engine.payload

    def payload(job, **kwargs):
        alive_while_computing.append(bodies[-1]() is not None)
        return real_payload(job, **kwargs)

    monkeypatch.setattr(engine, "payload", payload)
    body = orjson.dumps(LARGE_BODIES[path])
    assert len(body) > pipeline.INLINE_BODY_BYTES

    response = await client.post(path, content=body, headers={"content-type": "application/json"})

    assert response.status_code == 200, response.text
    assert alive_while_computing and not any(alive_while_computing)


def test_building_the_seeded_modules_loads_no_symbolic_maths():
    """torch's `skip_init` imports sympy on its first call (~1 s and ~36 MB on a server's first
    request for a configuration): building every variant's module must not."""
    script = """
import sys
from attention import VARIANTS, AttentionConfig, AttentionRunner
runner = AttentionRunner()
for variant in VARIANTS.values():
    options = tuple((option.name, option.resolve(None, 8)) for option in variant.options)
    for implementation in variant.implementations:
        bias = implementation != "v1"  # SelfAttention_v1 has no bias vectors
        runner.seeded(variant, AttentionConfig(8, 8, 2, 1, 0.0, bias, implementation, options))
print("sympy" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr
