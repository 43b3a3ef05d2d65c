"""The Open Inference Protocol (v2) endpoints: the native endpoint's numbers, the protocol's
shapes and error form, its health and metadata."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from attention import VARIANTS
from service.examples import BOOK_INPUTS
from service.main import create_app
from service.routes import inference_protocol
from service.settings import Settings
from tests.contract import MULTI_HEAD

INFER_PATH = "/v2/models/{model_name}/infer"
CASES = [
    (variant.name, implementation)
    for variant in VARIANTS.values()
    for implementation in (variant.implementation_names or [None])
]
RNG = np.random.default_rng(20240611)
SMALL = RNG.standard_normal((7, 4)).astype(np.float32)  # T 7, d_in 4: computed on the loop
BATCH = RNG.standard_normal((3, 5, 4)).astype(np.float32)
# T 128 x d_in 64: a body over 64 KiB and work over the inline limit, so a worker thread.
LARGE = RNG.standard_normal((128, 64)).astype(np.float32)


def protocol_app(settings: Settings | None = None):
    app = create_app(settings or Settings())
    if INFER_PATH not in app.openapi()["paths"]:
        app.include_router(inference_protocol.router)  # until service.main includes it
        app.openapi_schema = None  # drawn again, with the protocol, on the next request
    return app


def client_of(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(protocol_app()) as client:
        yield client


def parameters_for(name: str, implementation: str | None, d_in: int) -> dict[str, Any]:
    """Parameters that exercise the variant: every one it takes, none at its default."""
    parameters: dict[str, Any] = {}
    if name != "simplified":
        parameters |= {
            "d_out": 4 if d_in != 4 else 6,
            "seed": 7,
            "qkv_bias": implementation != "v1",
        }
    if name in ("causal", "multi-head"):
        parameters["dropout"] = 0.25
    if name == "multi-head":
        parameters |= {"num_heads": 2 if implementation == "fused" else 3}
    if implementation is not None:
        parameters["implementation"] = implementation
    return parameters


def infer_body(array: np.ndarray, parameters: dict[str, Any], nested: bool = False, **extra):
    data = array.tolist() if nested else array.ravel().tolist()
    body = {
        "inputs": [
            {"name": "embeddings", "shape": list(array.shape), "datatype": "FP32", "data": data}
        ],
        **extra,
    }
    if parameters:
        body["parameters"] = parameters
    return body


async def native(client, name: str, array: np.ndarray, parameters: dict[str, Any]):
    response = await client.post(
        f"/attention/{name}", json={"embeddings": array.tolist(), **parameters}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def infer(client, name: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = await client.post(f"/v2/models/{name}/infer", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def tensors(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    """The output tensors, reshaped from their flat data."""
    found = {}
    for output in answer["outputs"]:
        assert output["datatype"] == "FP32"
        assert isinstance(output["data"], list)
        assert len(output["data"]) == int(np.prod(output["shape"]))
        found[output["name"]] = np.array(output["data"], dtype=np.float64).reshape(output["shape"])
    return found


def assert_same_answer(protocol: dict[str, Any], expected: dict[str, Any], name: str) -> None:
    assert protocol["model_name"] == name
    outputs = tensors(protocol)
    assert list(outputs) == [
        key for key in ("attention_weights", "context_vectors") if key in expected
    ]
    for key, array in outputs.items():
        reference = np.array(expected[key], dtype=np.float64)
        assert array.shape == reference.shape, key
        np.testing.assert_array_equal(array, reference, err_msg=key)  # exactly the same numbers
    resolved = {key: value for key, value in expected["config"].items() if value is not None}
    assert protocol["parameters"] == resolved


# --- the native endpoint's numbers --------------------------------------------------------------


@pytest.mark.parametrize(("name", "implementation"), CASES)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("inputs", ["small", "batch", "large"])
async def test_infer_equals_the_native_answer(client, name, implementation, nested, inputs):
    array = {"small": SMALL, "batch": BATCH, "large": LARGE}[inputs]
    parameters = parameters_for(name, implementation, array.shape[-1])

    expected = await native(client, name, array, parameters)
    answer = await infer(client, name, infer_body(array, parameters, nested=nested))

    assert_same_answer(answer, expected, name)


@pytest.mark.parametrize(("name", "implementation"), CASES)
async def test_infer_with_default_parameters_equals_the_native_answer(client, name, implementation):
    parameters = {"implementation": implementation} if implementation else {}

    expected = await native(client, name, SMALL, parameters)
    answer = await infer(client, name, infer_body(SMALL, parameters))

    assert_same_answer(answer, expected, name)


async def test_the_books_self_attention_v2_numbers(client):
    body = infer_body(np.asarray(BOOK_INPUTS, dtype=np.float32), {"d_out": 2, "seed": 789})
    outputs = tensors(await infer(client, "self-attention", body))

    assert outputs["context_vectors"].shape == (6, 2)
    np.testing.assert_allclose(outputs["context_vectors"][1], [-0.0748, 0.0703], atol=1e-4)


@pytest.mark.parametrize("name", ["multi-head", "causal"])
async def test_shapes_of_a_batch(client, name):
    parameters = {"d_out": 4, "num_heads": 2} if name == "multi-head" else {"d_out": 4}
    outputs = tensors(await infer(client, name, infer_body(BATCH, parameters)))

    weights = (3, 2, 5, 5) if name == "multi-head" else (3, 5, 5)
    assert outputs["attention_weights"].shape == weights
    assert outputs["context_vectors"].shape == (3, 5, 4)


async def test_requested_outputs_only_and_the_fused_path_without_weights(client):
    parameters = {"d_out": 4, "num_heads": 2}
    body = infer_body(LARGE, parameters, outputs=[{"name": "context_vectors"}])

    answer = await infer(client, "multi-head", body)
    expected = await native(client, "multi-head", LARGE, {**parameters, "return_weights": False})

    assert [output["name"] for output in answer["outputs"]] == ["context_vectors"]
    assert answer["parameters"]["return_weights"] is False
    assert_same_answer(answer, expected, "multi-head")


async def test_outputs_come_in_the_order_requested(client):
    outputs = [{"name": "context_vectors"}, {"name": "attention_weights"}]
    answer = await infer(client, "causal", infer_body(SMALL, {}, outputs=outputs))

    assert [output["name"] for output in answer["outputs"]] == [
        "context_vectors",
        "attention_weights",
    ]


async def test_the_id_comes_back_and_decimals_round(client):
    body = infer_body(SMALL, {"decimals": 2}, id="request-42")
    answer = await infer(client, "simplified", body)

    assert answer["id"] == "request-42"
    for array in tensors(answer).values():
        np.testing.assert_array_equal(array, np.round(array, 2))


async def test_without_an_id_the_answer_has_none(client):
    assert "id" not in await infer(client, "simplified", infer_body(SMALL, {}))


async def test_binary_data_turned_off_is_accepted(client):
    """What Triton's client sends for JSON outputs."""
    body = infer_body(
        SMALL,
        {"binary_data_output": False},
        outputs=[{"name": "context_vectors", "parameters": {"binary_data": False}}],
    )
    assert (await infer(client, "simplified", body))["outputs"][0]["name"] == "context_vectors"


# --- errors: the protocol's {"error": ...}, never a 500 ------------------------------------------


def tensor(shape, data, datatype="FP32", name="embeddings") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


OK = [1.0, 2.0, 3.0, 4.0]

BAD_REQUESTS = {
    "fp64": (tensor([2, 2], OK, "FP64"), "FP32"),
    "int32": (tensor([2, 2], [1, 2, 3, 4], "INT32"), "FP32"),
    "too few numbers": (tensor([2, 2], OK[:3]), "holds 4 numbers but data has 3"),
    "too many numbers": (tensor([2, 2], [*OK, 5.0]), "holds 4 numbers but data has 5"),
    "nested shape differs": (tensor([2, 2], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "[2, 3]"),
    "ragged": (tensor([2, 2], [[1.0, 2.0], [3.0]]), "rectangular"),
    "nested too shallow": (tensor([2, 2, 2], [[1.0, 2.0], [3.0, 4.0]]), "nested 3 deep"),
    "a boolean": (tensor([2, 2], [1.0, 2.0, True, 4.0]), "data[2]"),
    "a string": (tensor([2, 2], [1.0, "2", 3.0, 4.0]), "data[1]"),
    "null data": (tensor([2, 2], None), "list of numbers"),
    "overflow": (tensor([2, 2], [1.0, 2.0, 3.0, 1e39]), "[1][1]"),
    "1-d shape": (tensor([4], OK), "[T, d_in]"),
    "4-d shape": (tensor([1, 1, 2, 2], OK), "[T, d_in]"),
    "zero dimension": (tensor([0, 4], []), "at least 1"),
    "negative dimension": (tensor([-2, -2], OK), "at least 1"),
    "wrong input name": (tensor([2, 2], OK, name="x"), "'embeddings'"),
    "no inputs": ({"inputs": []}, "'embeddings'"),
    "two inputs": (
        {"inputs": tensor([2, 2], OK)["inputs"] * 2},
        "one input tensor",
    ),
    "no inputs field": ({"parameters": {}}, "inputs"),
    "shape of strings": (tensor(["2", "2"], OK), "shape"),
    "unknown top-level field": ({**tensor([2, 2], OK), "input": []}, "input"),
    "unknown parameter": ({**tensor([2, 2], OK), "parameters": {"heads": 2}}, "'heads'"),
    "text parameter": ({**tensor([2, 2], OK), "parameters": {"embedding_dim": 8}}, "embedding_dim"),
    "parameter out of range": ({**tensor([2, 2], OK), "parameters": {"d_out": 0}}, "'d_out'"),
    "parameter of a wrong type": (
        {**tensor([2, 2], OK), "parameters": {"qkv_bias": "yes"}},
        "'qkv_bias'",
    ),
    "dropout of 1": ({**tensor([2, 2], OK), "parameters": {"dropout": 1.0}}, "'dropout'"),
    "unknown implementation": (
        {**tensor([2, 2], OK), "parameters": {"implementation": "v1"}},
        "'fused' or 'wrapper'",
    ),
    "heads that do not divide d_out": (
        {**tensor([2, 2], OK), "parameters": {"num_heads": 3}},
        "not divisible by num_heads=3",
    ),
    "a nested parameter": ({**tensor([2, 2], OK), "parameters": {"d_out": [2]}}, "parameters"),
    "unknown output": ({**tensor([2, 2], OK), "outputs": [{"name": "logits"}]}, "'logits'"),
    "no outputs": ({**tensor([2, 2], OK), "outputs": []}, "at least one"),
    "an output twice": (
        {**tensor([2, 2], OK), "outputs": [{"name": "context_vectors"}] * 2},
        "twice",
    ),
    "weights refused yet requested": (
        {
            **tensor([2, 2], OK),
            "parameters": {"return_weights": False},
            "outputs": [{"name": "attention_weights"}],
        },
        "return_weights",
    ),
    "binary data": (
        {**tensor([2, 2], OK), "parameters": {"binary_data_output": True}},
        "binary tensor data extension",
    ),
    "binary output": (
        {
            **tensor([2, 2], OK),
            "outputs": [{"name": "context_vectors", "parameters": {"binary_data": True}}],
        },
        "binary tensor data extension",
    ),
    "an id that is not a string": ({**tensor([2, 2], OK), "id": 42}, "id"),
    "not an object": ([1, 2], "object"),
}


@pytest.mark.parametrize(("body", "expected"), BAD_REQUESTS.values(), ids=list(BAD_REQUESTS))
async def test_a_bad_request_is_a_400_that_says_why(client, body, expected):
    answer = await infer(client, "multi-head", body, status=400)

    assert list(answer) == ["error"]
    assert expected in answer["error"]


DEEP = (
    b'{"inputs": [{"name": "embeddings", "shape": [1, 1], "datatype": "FP32", "data": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}]}"
)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "empty"), (b"{", "not valid JSON"), (DEEP, "too deeply"), (b"\xff", "JSON")],
    ids=["empty", "truncated", "deep", "not utf-8"],
)
async def test_a_body_that_is_not_json_is_a_400(client, content, expected):
    response = await client.post("/v2/models/causal/infer", content=content)

    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


async def test_an_unknown_model_is_a_404_that_lists_the_models(client):
    for response in [
        await client.post("/v2/models/transformer/infer", json=tensor([2, 2], OK)),
        await client.get("/v2/models/transformer"),
        await client.get("/v2/models/transformer/ready"),
    ]:
        assert response.status_code == 404
        error = response.json()["error"]
        assert "'transformer'" in error
        assert all(name in error for name in VARIANTS)


async def test_a_limit_is_a_400_naming_the_setting():
    async with client_of(protocol_app(Settings(max_tokens=4))) as client:
        answer = await infer(client, "causal", infer_body(SMALL, {}), status=400)

    assert "ATTENTION_MAX_TOKENS" in answer["error"]
    assert "tokens = 7" in answer["error"]


async def test_a_body_over_its_limit_is_a_413():
    async with client_of(protocol_app(Settings(max_body_bytes=1000))) as client:
        answer = await infer(client, "causal", infer_body(LARGE, {}), status=413)

    assert "ATTENTION_MAX_BODY_BYTES" in answer["error"]


async def test_a_saturated_service_is_a_503_with_retry_after():
    app = protocol_app()
    slots = app.state.compute_slots
    slots.admitted = slots.capacity  # every slot taken
    async with client_of(app) as client:
        response = await client.post("/v2/models/causal/infer", json=infer_body(LARGE, {}))

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "ATTENTION_MAX_CONCURRENT_COMPUTATIONS" in response.json()["error"]


# --- health and metadata ------------------------------------------------------------------------


async def test_server_live(client):
    response = await client.get("/v2/health/live")

    assert (response.status_code, response.json()) == (200, {"live": True})


async def test_server_and_models_are_ready_only_after_the_lifespan():
    app = protocol_app()
    async with client_of(app) as client:
        before = [await client.get("/v2/health/ready"), await client.get("/v2/models/causal/ready")]
        async with app.router.lifespan_context(app):
            # The warm-up runs behind the open port: ready once it is done.
            for _ in range(1200):
                if (await client.get("/v2/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            after = [
                await client.get("/v2/health/ready"),
                await client.get("/v2/models/causal/ready"),
            ]

    assert [response.status_code for response in before] == [400, 400]  # the protocol's 4xx
    assert [response.status_code for response in after] == [200, 200]
    assert after[0].json() == {"ready": True}
    assert after[1].json() == {"name": "causal", "ready": True}


async def test_server_metadata(client):
    response = await client.get("/v2")

    assert response.status_code == 200
    assert response.json() == {"name": "attention-service", "version": "0.1.0", "extensions": []}


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_model_metadata(client, name):
    response = await client.get(f"/v2/models/{name}")
    metadata = response.json()
    listing = {variant["name"]: variant for variant in (await client.get("/attention")).json()}

    assert response.status_code == 200
    assert metadata["name"] == name
    assert metadata["platform"] == "pytorch"
    assert metadata["inputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, -1]}]
    weights = [-1, -1, -1] if name in MULTI_HEAD else [-1, -1]
    assert metadata["outputs"] == [
        {"name": "attention_weights", "datatype": "FP32", "shape": weights},
        {"name": "context_vectors", "datatype": "FP32", "shape": [-1, -1]},
    ]
    # The protocol's input is one T x d_in tensor: no text, no batch to mask.
    text_only = {"embedding_dim", "context_length", "embedding_seed", "attention_mask"}
    native_parameters = listing[name]["parameters"]
    assert metadata["parameters"] == {
        key: value for key, value in native_parameters.items() if key not in text_only
    }
    assert metadata["implementations"] == [
        implementation["name"] for implementation in listing[name]["implementations"]
    ]
    assert metadata["book_section"] == listing[name]["book_section"]


async def test_every_parameter_the_metadata_lists_is_accepted(client):
    for name in VARIANTS:
        metadata = (await client.get(f"/v2/models/{name}")).json()
        defaults = {
            key: parameter["default"]
            for key, parameter in metadata["parameters"].items()
            if parameter["default"] is not None
        }
        answer = await infer(client, name, infer_body(SMALL, defaults))
        assert answer["model_name"] == name


# --- the OpenAPI document -----------------------------------------------------------------------


async def test_openapi_documents_the_protocol_and_its_examples_work(client):
    openapi = (await client.get("/openapi.json")).json()
    paths = openapi["paths"]

    for path in ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}"]:
        assert "get" in paths[path], path
    operation = paths[INFER_PATH]["post"]
    assert {"200", "400", "404", "413", "503"} <= set(operation["responses"])
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    assert {key.split("_")[0] for key in examples} == set(VARIANTS)
    for key, example in examples.items():
        name = key.split("_")[0]
        response = await client.post(f"/v2/models/{name}/infer", json=example["value"])
        assert response.status_code == 200, (key, response.text)
