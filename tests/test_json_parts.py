"""Large answers are sent in parts (service.json_parts) that join to exactly orjson's bytes."""

import asyncio
import gc
import threading
import weakref

import httpx
import numpy as np
import orjson
import pytest

from service import json_parts
from service.json_parts import dumps_in_parts
from service.main import create_app
from service.routes.attention import written_ahead
from service.settings import Settings
from tests.conftest import BOOK
from tests.contract import VARIANTS

rng = np.random.default_rng(0)


def whole(payload) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


PAYLOADS = {
    "context vectors": {"variant": "causal", "context_vectors": rng.standard_normal((37, 5))},
    "heads": {"attention_weights": rng.standard_normal((2, 3, 11, 11)).astype(np.float32)},
    "padding as null": {"weights": np.where(rng.random((9, 9)) > 0.5, np.nan, 1.0)},
    "several, nested": {
        "attention_weights": rng.standard_normal((1, 13, 13)).astype(np.float32),
        "context_vectors": rng.standard_normal((1, 13, 4)).astype(np.float32),
        "tokens": [{"id": 464, "text": 'a "quoted" token'}],
        "padding_mask": np.zeros((1, 13), dtype=bool),
        "steps": {"keys": {"shape": [1, 13, 4], "data": rng.standard_normal((1, 13, 4))}},
        "config": {"seed": None, "decimals": 4},
    },
    "one vector": {"bias": rng.standard_normal(100)},
    "a row wider than a part": {"context_vectors": rng.standard_normal((3, 50))},
    "one batch entry of heads": {
        "attention_weights": rng.standard_normal((1, 3, 9, 9)).astype(np.float32)
    },
    "entries wider than a part": {"steps": rng.standard_normal((2, 3, 4, 5))},
}


@pytest.mark.parametrize("part_floats", [1, 7, 40, 10_000])
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_the_parts_join_to_orjsons_bytes(monkeypatch, name, part_floats):
    monkeypatch.setattr(json_parts, "PART_FLOATS", part_floats)
    payload = PAYLOADS[name]

    parts = list(dumps_in_parts(payload))

    assert b"".join(parts) == whole(payload)
    largest = max(
        (value for value in payload.values() if isinstance(value, np.ndarray)), key=np.size
    )
    if largest.size > part_floats and largest.ndim > 1:
        assert len(parts) > 3, "a large array is written in several parts"


def test_a_token_text_that_looks_like_a_placeholder_stays_text(monkeypatch):
    monkeypatch.setattr(json_parts, "PART_FLOATS", 4)
    payload = {"text": "0" * 32 + ":0", "data": np.arange(20.0).reshape(10, 2)}
    assert b"".join(dumps_in_parts(payload)) == whole(payload)


async def whole_and_streamed(monkeypatch, path: str, request) -> tuple[httpx.Response, ...]:
    """The answer to `request` from an app with the default thresholds (whole), then from one
    that streams anything over 10 numbers in parts of 16; both compute on a worker thread, as
    large answers are computed."""
    settings = Settings(inline_work_limit=0)
    answers = []
    for streamed in (False, True):
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if streamed:
                monkeypatch.setattr(json_parts, "STREAMED_ANSWER_FLOATS", 10)
                monkeypatch.setattr(json_parts, "PART_FLOATS", 16)
            answers.append(await client.post(path, json=request))
    whole, streamed_answer = answers
    assert whole.status_code == streamed_answer.status_code == 200
    assert "content-length" in whole.headers
    assert "content-length" not in streamed_answer.headers  # sent as it is written
    assert streamed_answer.content == whole.content
    return whole, streamed_answer


async def test_a_large_answer_is_streamed_with_the_bytes_of_a_whole_one(monkeypatch):
    request = {"embeddings": [BOOK["inputs"]] * 3, "d_out": 4, "num_heads": 2}
    _, streamed = await whole_and_streamed(monkeypatch, "/attention/multi-head", request)

    weights = np.array(streamed.json()["attention_weights"])
    assert weights.shape == (3, 2, 6, 6)
    np.testing.assert_allclose(weights.sum(axis=-1), 1, rtol=1e-6)


async def test_a_large_comparison_is_streamed_with_the_bytes_of_a_whole_one(monkeypatch):
    request = {"embeddings": [BOOK["inputs"]] * 3, "d_out": 4, "num_heads": 2}
    _, streamed = await whole_and_streamed(monkeypatch, "/attention/compare", request)

    assert list(streamed.json()["answers"]) == list(VARIANTS)


async def test_a_large_inference_answer_is_streamed_with_the_bytes_of_a_whole_one(monkeypatch):
    data = np.array([BOOK["inputs"]] * 3, dtype=np.float32)
    embeddings = {
        "name": "embeddings",
        "shape": list(data.shape),
        "datatype": "FP32",
        "data": data.ravel().tolist(),
    }
    request = {"inputs": [embeddings], "parameters": {"d_out": 4, "num_heads": 2}}
    _, streamed = await whole_and_streamed(monkeypatch, "/v2/models/multi-head/infer", request)

    outputs = {output["name"]: output for output in streamed.json()["outputs"]}
    assert outputs["attention_weights"]["shape"] == [3, 2, 6, 6]
    assert len(outputs["attention_weights"]["data"]) == 3 * 2 * 6 * 6


async def test_the_next_part_is_written_while_one_is_sent():
    asked = [threading.Event() for _ in range(3)]

    def parts():
        for index in range(3):
            asked[index].set()
            yield f"part {index};".encode()

    received = []
    async for part in written_ahead(parts()):
        received.append(part)
        if len(received) < 3:  # the next part is asked for before this one is done with
            assert await asyncio.to_thread(asked[len(received)].wait, 5), "not written ahead"
    assert received == [b"part 0;", b"part 1;", b"part 2;"]


def test_the_arrays_are_freed_once_their_parts_are_written(monkeypatch):
    """Nothing keeps an answer's arrays once its parts are written: no reference cycle holds
    them until the cycle collector runs (the long input's 12.6 MB context vectors did)."""
    monkeypatch.setattr(json_parts, "PART_FLOATS", 16)
    array = rng.standard_normal((40, 8))
    payload = {"context_vectors": array, "steps": {"keys": [array]}}
    expected = whole(payload)
    freed = weakref.ref(array)
    gc.disable()  # only plain reference counting may free it
    try:
        parts = b"".join(dumps_in_parts(payload))
        del payload, array
        assert freed() is None
    finally:
        gc.enable()
    assert parts == expected
