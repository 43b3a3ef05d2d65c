"""Operations: request ids, metrics, logs, saturation, answer-size limit, determinism under load."""

import asyncio
import io
import json
import logging
import re
import time

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest

from service.main import create_app
from service.observability import JsonFormatter, Metrics, json_handler_alone, log_request
from service.settings import ACCESS_LOG_FLUSH_SECONDS, Settings
from tests.conftest import BOOK, make_client, metric

BOOK_REQUEST = {"embeddings": BOOK["inputs"], "d_out": 2, "seed": 789}


async def test_a_request_id_is_echoed_when_given_and_made_when_not(client):
    given = await client.post(
        "/attention/self-attention", json=BOOK_REQUEST, headers={"X-Request-ID": "trace-42"}
    )
    made = await client.post("/attention/self-attention", json=BOOK_REQUEST)
    unprintable = await client.get("/healthz", headers={"X-Request-ID": "a" * 200})

    assert given.headers["x-request-id"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", unprintable.headers["x-request-id"])


async def test_metrics_count_requests_by_route_and_status_and_tokens_by_variant():
    async with make_client(Settings()) as client:
        await client.post("/attention/causal", json={"embeddings": BOOK["inputs"]})
        await client.post("/attention/causal", json={"embeddings": [BOOK["inputs"]] * 3})
        await client.post("/attention/causal", json={"embeddings": [[1, True]]})
        await client.post("/attention/nope", json={})
        response = await client.get("/metrics")

    text = response.text
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    requests = "attention_http_requests_total"
    assert metric(text, requests, method="POST", route="/attention/causal", status="200") == 2
    assert metric(text, requests, method="POST", route="/attention/causal", status="422") == 1
    assert metric(text, requests, method="POST", route="/attention/{variant}", status="404") == 1
    assert metric(text, "attention_tokens_processed_total", variant="causal") == 6 + 18
    latency = "attention_http_request_duration_seconds_count"
    assert metric(text, latency, method="POST", route="/attention/causal") == 3


def test_latency_is_counted_in_cumulative_buckets_as_prometheus_defines_them():
    metrics = Metrics()
    for seconds in (0.0004, 0.001, 0.003, 20.0):  # 0.001 is on a bound: `le` includes it
        metrics.count_request("POST", "/attention/causal", 200, seconds)
    metrics.count_request("POST", "/attention/causal", 422, 0.002)

    text = generate_latest(metrics.registry).decode()
    labels = {"method": "POST", "route": "/attention/causal"}
    bucket = "attention_http_request_duration_seconds_bucket"
    assert metric(text, bucket, le="0.001", **labels) == 2
    assert metric(text, bucket, le="0.0025", **labels) == 3
    assert metric(text, bucket, le="0.005", **labels) == 4
    assert metric(text, bucket, le="10.0", **labels) == 4
    assert metric(text, bucket, le="+Inf", **labels) == 5
    assert metric(text, "attention_http_request_duration_seconds_count", **labels) == 5
    total = metric(text, "attention_http_request_duration_seconds_sum", **labels)
    assert total == pytest.approx(20.0064)
    requests = "attention_http_requests_total"
    assert metric(text, requests, **labels, status="200") == 4
    assert metric(text, requests, **labels, status="422") == 1
    assert metric(text, "attention_http_request_duration_seconds_created", **labels) > 0


async def test_each_request_logs_one_json_line_with_its_id():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("service.access")
    logger.addHandler(handler)
    try:
        async with make_client(Settings()) as client:
            await client.post(
                "/attention/simplified",
                json={"embeddings": [[1.0, 2.0]]},
                headers={"X-Request-ID": "abc"},
            )
    finally:
        logger.removeHandler(handler)

    (record,) = records
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "abc"
    assert fields["route"] == "/attention/simplified"
    assert fields["status"] == 200
    assert fields["duration_ms"] > 0
    assert '"request_id":"abc"' in JsonFormatter().format(record)


async def test_the_access_line_written_directly_is_the_one_logging_would_write(monkeypatch):
    service_logger = logging.getLogger("service")
    handler = next(handler for handler in service_logger.handlers if handler.is_json)
    # pytest hangs its capture handlers on the logger too: leave the JSON handler alone, as
    # configure_logging sets it up, to take the direct path.
    monkeypatch.setattr(service_logger, "handlers", [handler])
    assert json_handler_alone() is handler
    direct = io.StringIO()
    monkeypatch.setattr(handler, "stream", direct)
    async with make_client(Settings()) as client:
        sent = time.time()
        await client.post(
            "/attention/simplified",
            json={"embeddings": [[1.0, 2.0]]},
            headers={"X-Request-ID": "direct-1"},
        )
        answered = time.time()
        await asyncio.sleep(2 * ACCESS_LOG_FLUSH_SECONDS)  # the line waits for the next flush
    (line,) = direct.getvalue().splitlines()
    written = json.loads(line)

    assert written.pop("duration_ms") > 0
    # The request's time, to the second, not the later flush's.
    formatter = JsonFormatter()
    assert written.pop("time") in {formatter.timestamp(sent), formatter.timestamp(answered)}
    assert written == {
        "level": "info",
        "logger": "service.access",
        "message": "request",
        "request_id": "direct-1",
        "method": "POST",
        "path": "/attention/simplified",
        "route": "/attention/simplified",
        "status": 200,
    }
    # Through logging (another handler present) the line has the same keys, in the same order.
    record = logging.LogRecord("service.access", logging.INFO, "", 0, "request", (), None)
    record.fields = {
        key: value
        for key, value in json.loads(line).items()
        if key not in ("time", "level", "logger", "message")
    }  # type: ignore[attr-defined]
    assert list(json.loads(JsonFormatter().format(record))) == list(json.loads(line))


def recording_json_handler(monkeypatch) -> list[str]:
    """The JSON handler alone on the service's logger, its writes recorded."""
    service_logger = logging.getLogger("service")
    handler = next(handler for handler in service_logger.handlers if handler.is_json)
    monkeypatch.setattr(service_logger, "handlers", [handler])
    assert json_handler_alone() is handler
    writes: list[str] = []

    class Recording:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(handler, "stream", Recording())
    return writes


def request_ids(writes: list[str]) -> list[list[str]]:
    return [[json.loads(line)["request_id"] for line in text.splitlines()] for text in writes]


async def test_the_lines_of_one_interval_are_written_together_in_order(monkeypatch):
    writes = recording_json_handler(monkeypatch)
    for index in range(3):
        log_request({"request_id": f"line-{index}"})
        await asyncio.sleep(0)  # each on its own turn of the loop
    assert writes == []  # nothing before the interval ends
    await asyncio.sleep(2 * ACCESS_LOG_FLUSH_SECONDS)

    assert request_ids(writes) == [["line-0", "line-1", "line-2"]]
    log_request({"request_id": "line-3"})  # a new interval, a new write
    await asyncio.sleep(2 * ACCESS_LOG_FLUSH_SECONDS)
    assert request_ids(writes) == [["line-0", "line-1", "line-2"], ["line-3"]]


async def test_a_line_left_by_a_closed_loop_is_written_by_the_next_flush(monkeypatch):
    writes = recording_json_handler(monkeypatch)

    async def log_and_close() -> None:
        log_request({"request_id": "from-a-closed-loop"})  # its loop ends before the flush

    await asyncio.to_thread(asyncio.run, log_and_close())
    assert writes == []
    log_request({"request_id": "from-this-loop"})
    await asyncio.sleep(2 * ACCESS_LOG_FLUSH_SECONDS)

    assert request_ids(writes) == [["from-a-closed-loop", "from-this-loop"]]


async def test_a_broken_log_stream_never_fails_the_request(monkeypatch):
    service_logger = logging.getLogger("service")
    handler = next(handler for handler in service_logger.handlers if handler.is_json)
    monkeypatch.setattr(service_logger, "handlers", [handler])
    assert json_handler_alone() is handler

    class Broken:
        def write(self, text):
            raise BrokenPipeError("the log reader is gone")

        def flush(self):
            pass

    monkeypatch.setattr(handler, "stream", Broken())
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as logging reports in production
    async with make_client(Settings()) as client:
        response = await client.post("/attention/simplified", json={"embeddings": [[1.0, 2.0]]})
        await asyncio.sleep(2 * ACCESS_LOG_FLUSH_SECONDS)  # the line's write, and its failure

    assert response.status_code == 200
    assert response.json()["context_vectors"] == [[1.0, 2.0]]


async def test_a_full_queue_of_large_computations_answers_503_with_retry_after():
    settings = Settings(max_concurrent_computations=1, max_queued_computations=0)
    large = {
        "embeddings": np.random.default_rng(0).standard_normal((512, 256)).tolist(),
        "num_heads": 4,
        "return_weights": False,
    }
    async with make_client(settings) as client:
        first, second = await asyncio.gather(
            client.post("/attention/multi-head", json=large),
            client.post("/attention/multi-head", json=large),
        )
        small = await client.post("/attention/self-attention", json=BOOK_REQUEST)
        metrics = (await client.get("/metrics")).text

    assert sorted([first.status_code, second.status_code]) == [200, 503]
    refused = first if first.status_code == 503 else second
    assert refused.headers["retry-after"] == "1"
    assert "ATTENTION_MAX_CONCURRENT_COMPUTATIONS" in refused.json()["detail"]
    assert small.status_code == 200  # tiny requests are computed inline, never refused
    assert metric(metrics, "attention_saturated_refusals_total") == 1


async def test_an_answer_over_the_number_limit_is_refused_before_any_work():
    async with make_client(Settings(max_answer_floats=40)) as client:
        response = await client.post("/attention/self-attention", json=BOOK_REQUEST)
        without_weights = await client.post(
            "/attention/self-attention", json={**BOOK_REQUEST, "return_weights": False}
        )

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["type"] == "limit_exceeded"
    assert "numbers in the answer = 48" in error["msg"]  # 6 x 6 weights + 6 x 2 context
    assert "ATTENTION_MAX_ANSWER_FLOATS" in error["msg"]
    assert without_weights.status_code == 200


@pytest.fixture(scope="module")
def concurrent_app():
    # Room for all 64 at once: this test is about answers, not refusals.
    return create_app(Settings(max_queued_computations=64))


async def test_64_concurrent_requests_over_8_seeds_each_equal_their_serial_answer(concurrent_app):
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((2, 64, 32)).round(4).tolist()  # large: worker threads
    bodies = [
        {"embeddings": inputs, "num_heads": 4, "seed": seed, "dropout": 0.3} for seed in range(8)
    ]
    transport = httpx.ASGITransport(app=concurrent_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        serial = [
            (await client.post("/attention/multi-head", json=body)).content for body in bodies
        ]
        order = [index % 8 for index in range(64)]
        concurrent = await asyncio.gather(
            *(client.post("/attention/multi-head", json=bodies[index]) for index in order)
        )

    # Large enough to run on worker threads, where a shared RNG would show.
    assert concurrent_app.state.engine.settings.inline_work_limit < 2 * 64 * (4 * 32 * 32)
    assert len(set(serial)) == 8  # the seeds do give different answers
    for index, response in zip(order, concurrent, strict=True):
        assert response.status_code == 200
        assert response.content == serial[index]
