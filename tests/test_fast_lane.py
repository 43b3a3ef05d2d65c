"""The fast lane (service.fast_lane) answers exactly as FastAPI's router does, errors included."""

from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest

from service.main import create_app
from service.settings import Settings
from tests.conftest import BOOK, metric

SETTINGS = Settings(max_body_bytes=50_000, max_tokens=100)
JSON = "application/json"


def client_of(app, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
        base_url="http://testserver",
    )


@pytest.fixture(scope="module")
def apps():
    with_lane = create_app(SETTINGS)
    without_lane = create_app(SETTINGS)
    assert with_lane.fast_lane.routes
    without_lane.fast_lane.routes = {}  # every request through Starlette's stack and the router
    return with_lane, without_lane


LARGE = np.random.default_rng(0).standard_normal((64, 32)).round(4).tolist()

REQUESTS: dict[str, tuple[str, str, Any]] = {
    "book self-attention": ("POST", "/attention/self-attention", {"embeddings": BOOK["inputs"]}),
    "book simplified": ("POST", "/attention/simplified", {"embeddings": BOOK["inputs"]}),
    "causal with dropout": (
        "POST",
        "/attention/causal",
        {"embeddings": BOOK["inputs"], "dropout": 0.5, "seed": 3},
    ),
    "multi-head steps": (
        "POST",
        "/attention/multi-head",
        {"embeddings": [BOOK["inputs"]] * 2, "d_out": 4, "include": ["queries", "mask"]},
    ),
    "on a worker thread": ("POST", "/attention/multi-head", {"embeddings": LARGE}),
    "text": ("POST", "/attention/causal", {"text": "Your journey starts with one step"}),
    "compare": ("POST", "/attention/compare", {"embeddings": BOOK["inputs"], "d_out": 2}),
    "422 field": ("POST", "/attention/causal", {"embeddings": BOOK["inputs"], "num_heads": 2}),
    "422 limit": ("POST", "/attention/causal", {"embeddings": [[1.0]] * 101}),
    "422 implementation": (
        "POST",
        "/attention/multi-head",
        {"embeddings": BOOK["inputs"], "d_out": 3, "num_heads": 2},
    ),
    "422 not json": ("POST", "/attention/self-attention", b"{nope"),
    "413": ("POST", "/attention/self-attention", b" " * 50_001),
    "415 form": ("POST", "/attention/self-attention", "a=1&b=2"),
    "404 unknown variant": ("POST", "/attention/nope", {"embeddings": BOOK["inputs"]}),
    "405": ("GET", "/attention/causal", None),
    "trailing slash": ("POST", "/attention/causal/", {"embeddings": BOOK["inputs"]}),
}


@pytest.mark.parametrize("name", list(REQUESTS))
async def test_the_fast_lane_answers_as_the_router_does(apps, name):
    method, path, body = REQUESTS[name]
    # bytes are sent as JSON, a str as a form, anything else through httpx's json=.
    content = body.encode() if isinstance(body, str) else body if isinstance(body, bytes) else None
    json = None if content is not None or body is None else body
    headers = {}
    if content is not None:
        form = isinstance(body, str)
        headers["content-type"] = "application/x-www-form-urlencoded" if form else JSON

    answers = []
    for app in apps:
        async with client_of(app) as client:
            answers.append(
                await client.request(method, path, content=content, json=json, headers=headers)
            )

    fast, routed = answers
    assert fast.status_code == routed.status_code
    assert fast.content == routed.content
    assert fast.headers.keys() == routed.headers.keys()
    for header in ("content-type", "content-length", "retry-after", "location", "allow"):
        assert fast.headers.get(header) == routed.headers.get(header), header


async def test_metrics_and_request_ids_see_the_route_as_the_router_names_it(apps):
    async with client_of(apps[0]) as client:
        response = await client.post(
            "/attention/simplified",
            json={"embeddings": BOOK["inputs"]},
            headers={"X-Request-ID": "lane-1"},
        )
        metrics = (await client.get("/metrics")).text

    assert response.headers["x-request-id"] == "lane-1"
    assert (
        'attention_http_requests_total{method="POST",route="/attention/simplified",status="200"}'
        in metrics
    )


async def test_the_openapi_document_is_the_routers(apps):
    documents = []
    for app in apps:
        async with client_of(app) as client:
            documents.append((await client.get("/openapi.json")).json())
    assert documents[0] == documents[1]


async def test_an_unexpected_error_is_a_plain_500_raised_on_to_the_server_as_routed(
    apps, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    answers = []
    for app in apps:
        monkeypatch.setattr(app.state.engine, "payload", broken)
        async with client_of(app) as client:
            with pytest.raises(RuntimeError, match="a bug"):  # the server logs its traceback
                await client.post("/attention/simplified", json={"embeddings": BOOK["inputs"]})
        async with client_of(app, raise_app_exceptions=False) as client:
            answers.append(
                await client.post(
                    "/attention/simplified",
                    json={"embeddings": BOOK["inputs"]},
                    headers={"X-Request-ID": "bug-1"},
                )
            )
        exposition = generate_latest(app.state.metrics.registry).decode()
        labels = {"method": "POST", "route": "/attention/simplified", "status": "500"}
        assert metric(exposition, "attention_http_requests_total", **labels) == 2

    fast, routed = answers
    assert fast.status_code == routed.status_code == 500
    assert fast.content == routed.content == b"Internal Server Error"
    assert fast.headers["x-request-id"] == routed.headers["x-request-id"] == "bug-1"
