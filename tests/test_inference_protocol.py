"""The Open Inference Protocol (v2) over REST, in process: the native endpoint's numbers, JSON and
Triton's binary tensor data, the protocol's shapes and error form, its health and metadata.

The binary bodies here are built and read by our own few lines, from the extension's definition
(a JSON header of Inference-Header-Content-Length bytes, then the raw little-endian tensors);
tests/test_protocol_clients.py holds the service to the real clients."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from attention import VARIANTS
from service.examples import BOOK_INPUTS
from service.main import create_app
from service.settings import Settings
from tests.contract import CAUSAL, MULTI_HEAD

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
    return create_app(settings or Settings())


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
    if name in CAUSAL:
        parameters["dropout"] = 0.25
    if name in MULTI_HEAD:
        parameters |= {"num_heads": 3 if implementation == "wrapper" else 2}
    parameters |= {"grouped-query": {"num_kv_groups": 2}, "sliding-window": {"window_size": 3}}.get(
        name, {}
    )
    if name == "latent":
        parameters["latent_dim"] = 3
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
    for key, value in expected.get("kv_cache", {}).items():
        resolved[f"kv_cache_{key}"] = value
    assert protocol["parameters"] == resolved
    assert protocol["model_version"] == "1"


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


async def test_whole_numbers_with_a_zero_fraction_are_whole(client):
    """JSON Schema's integer is 2.0 as well as 2 (the OpenAPI document says integer)."""
    body = infer_body(SMALL, {"d_out": 4.0, "num_heads": 2.0})
    body["inputs"][0]["shape"] = [7.0, 4.0]
    answer = await infer(client, "multi-head", body)

    assert answer["parameters"]["d_out"] == 4 and answer["parameters"]["num_heads"] == 2


async def test_without_an_id_the_answer_has_none(client):
    assert "id" not in await infer(client, "simplified", infer_body(SMALL, {}))


async def test_binary_data_turned_off_is_json(client):
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
    "int32": (tensor([2, 2], [1, 2, 3, 4], "INT32"), "takes FP32, FP64, FP16"),
    "bf16": (tensor([2, 2], OK, "BF16"), "takes FP32, FP64, FP16"),
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
    "an overflow": (tensor([2, 2], [1e20, 1e20, 1e19, -1e20]), "overflowed float32"),
    "a fraction in the shape": (tensor([2.5, 2], OK), "shape must be whole numbers; got 2.5"),
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
    "binary_data_output not a boolean": (
        {**tensor([2, 2], OK), "parameters": {"binary_data_output": 1}},
        "binary_data_output must be true or false",
    ),
    "binary_data not a boolean": (
        {
            **tensor([2, 2], OK),
            "outputs": [{"name": "context_vectors", "parameters": {"binary_data": "yes"}}],
        },
        "output 'context_vectors': binary_data must be true or false",
    ),
    "an unknown output parameter": (
        {
            **tensor([2, 2], OK),
            "outputs": [{"name": "context_vectors", "parameters": {"classification": 2}}],
        },
        "unknown parameters ['classification']",
    ),
    "binary data without a header": (
        {
            "inputs": [
                {
                    "name": "embeddings",
                    "shape": [2, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 16},
                }
            ]
        },
        "no Inference-Header-Content-Length header",
    ),
    "no data at all": (
        {"inputs": [{"name": "embeddings", "shape": [2, 2], "datatype": "FP32"}]},
        "has no data and no binary_data_size",
    ),
    "a list of steps": ({**tensor([2, 2], OK), "parameters": {"include": "queries"}}, "include"),
    "another model's name": ({**tensor([2, 2], OK), "model_name": "causal"}, "'causal'"),
    "another version": ({**tensor([2, 2], OK), "model_version": "2"}, "version '2'"),
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
    assert response.json() == {
        "name": "attention-service",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


@pytest.mark.parametrize("name", list(VARIANTS))
async def test_model_metadata(client, name):
    response = await client.get(f"/v2/models/{name}")
    metadata = response.json()
    listing = {variant["name"]: variant for variant in (await client.get("/attention")).json()}

    assert response.status_code == 200
    assert metadata["name"] == name
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "pytorch"
    assert metadata["inputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, -1]}]
    weights = [-1, -1, -1] if name in MULTI_HEAD else [-1, -1]
    assert metadata["outputs"] == [
        {"name": "attention_weights", "datatype": "FP32", "shape": weights},
        {"name": "context_vectors", "datatype": "FP32", "shape": [-1, -1]},
    ]
    # The protocol's input is one T x d_in tensor (no text, no batch to mask), and its
    # parameters are scalars (no list of steps, no weights).
    not_scalar = {"embedding_dim", "context_length", "embedding_seed", "attention_mask"}
    not_scalar |= {"include", "parameters"}
    native_parameters = listing[name]["parameters"]
    assert metadata["parameters"] == {
        key: value for key, value in native_parameters.items() if key not in not_scalar
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


# --- versions, paths and methods ----------------------------------------------------------------


async def test_version_1_is_the_model_and_any_other_a_404(client):
    body = infer_body(SMALL, {})
    plain = await client.post("/v2/models/causal/infer", json=body)
    versioned = await client.post("/v2/models/causal/versions/1/infer", json=body)
    assert versioned.status_code == 200 and versioned.content == plain.content
    assert (await client.get("/v2/models/causal/versions/1")).json()["name"] == "causal"
    # Ready or not (this client runs no lifespan), the version is found.
    assert (await client.get("/v2/models/causal/versions/1/ready")).json() == {
        "name": "causal",
        "ready": False,
    }

    for method, path in [
        ("POST", "/v2/models/causal/versions/2/infer"),
        ("GET", "/v2/models/causal/versions/2"),
        ("GET", "/v2/models/causal/versions/0/ready"),
    ]:
        response = await client.request(method, path, json=body if method == "POST" else None)
        assert response.status_code == 404, path
        assert response.json() == {
            "error": "model 'causal' has no version '"
            + path.split("/versions/")[1].split("/")[0]
            + "'; its one version is '1'"
        }


async def test_every_error_under_v2_is_the_protocols_error_object(client):
    cases = [
        ("GET", "/v2/models/causal/infer", 405, "does not take GET; it takes POST"),
        ("DELETE", "/v2", 405, "does not take DELETE"),
        ("GET", "/v2/repository/index", 404, "GET /v2/repository/index is no endpoint"),
        ("POST", "/v2/models/causal/load", 404, "is no endpoint"),
    ]
    for method, path, status, words in cases:
        response = await client.request(method, path)
        assert response.status_code == status, path
        assert response.headers["content-type"] == "application/json"
        assert list(response.json()) == ["error"] and words in response.json()["error"], path
    # Elsewhere FastAPI's own form stays.
    assert (await client.get("/nowhere")).json() == {"detail": "Not Found"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_neither_json_nor_binary_is_a_415(client, content_type):
    response = await client.post(
        "/v2/models/causal/infer",
        content=b'{"inputs": []}',
        headers={"Content-Type": content_type},
    )

    assert response.status_code == 415
    assert response.json()["error"] == (
        f"Content-Type {content_type!r} is not accepted: send application/json or "
        "application/octet-stream"
    )


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/octet-stream"]
)
async def test_json_comes_with_any_content_type_the_clients_send(client, content_type):
    """tritonclient's synchronous client names none, its asyncio client octet-stream."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(
        "/v2/models/causal/infer",
        content=orjson.dumps(infer_body(SMALL, {})),
        headers=headers,
    )

    assert response.status_code == 200, response.text


# --- Triton's binary tensor data extension -------------------------------------------------------


def binary_request(
    header: dict[str, Any], *tensors: bytes, length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A body as the extension defines it: the JSON header, then the raw tensors."""
    json_header = orjson.dumps(header)
    size = len(json_header) if length is None else length
    return json_header + b"".join(tensors), {"Inference-Header-Content-Length": str(size)}


def binary_input(array: np.ndarray, datatype: str = "FP32") -> tuple[dict[str, Any], bytes]:
    dtype = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2"}[datatype]
    raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
    spec = {
        "name": "embeddings",
        "shape": list(array.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    return spec, raw


def read_binary_answer(response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header and every output as an array, binary or JSON."""
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:length])
    arrays, offset = {}, length
    for output in header["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.array(output["data"], dtype=np.float32)
        else:
            raw = response.content[offset : offset + size]
            arrays[output["name"]] = np.frombuffer(raw, dtype="<f4")
            offset += size
        arrays[output["name"]] = arrays[output["name"]].reshape(output["shape"])
    assert offset == len(response.content), "the body ends with the last binary output"
    return header, arrays


@pytest.mark.parametrize(("name", "implementation"), CASES)
@pytest.mark.parametrize("inputs", ["small", "batch"])
async def test_binary_in_and_out_is_the_native_answer_to_the_bit(
    client, name, implementation, inputs
):
    array = {"small": SMALL, "batch": BATCH}[inputs]
    parameters = parameters_for(name, implementation, array.shape[-1])
    spec, raw = binary_input(array)
    header = {"inputs": [spec], "parameters": {**parameters, "binary_data_output": True}}
    body, headers = binary_request(header, raw)

    response = await client.post(f"/v2/models/{name}/infer", content=body, headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(response.content))
    answer, arrays = read_binary_answer(response)
    expected = await native(client, name, array, parameters)
    for output in OUTPUTS_OF:
        native_bits = np.asarray(expected[output], dtype=np.float32)  # orjson writes float32's
        np.testing.assert_array_equal(arrays[output], native_bits, err_msg=output)
        assert arrays[output].tobytes() == native_bits.tobytes(), output
    assert [output["parameters"]["binary_data_size"] for output in answer["outputs"]] == [
        arrays[output].nbytes for output in OUTPUTS_OF
    ]
    assert all("data" not in output for output in answer["outputs"])


OUTPUTS_OF = ("attention_weights", "context_vectors")


async def test_each_output_asks_for_binary_on_its_own(client):
    spec, raw = binary_input(SMALL)
    header = {
        "inputs": [spec],
        "outputs": [
            {"name": "context_vectors", "parameters": {"binary_data": True}},
            {"name": "attention_weights"},  # JSON
        ],
    }
    body, headers = binary_request(header, raw)
    response = await client.post("/v2/models/causal/infer", content=body, headers=headers)

    assert response.status_code == 200, response.text
    answer, arrays = read_binary_answer(response)
    described = {output["name"]: output for output in answer["outputs"]}
    assert "data" not in described["context_vectors"]
    assert "binary_data_size" not in described["attention_weights"].get("parameters", {})
    json_answer = await infer(client, "causal", infer_body(SMALL, {}))
    for name, array in tensors(json_answer).items():
        np.testing.assert_array_equal(arrays[name], array.astype(np.float32))


async def test_json_in_and_binary_out_and_binary_in_and_json_out(client):
    expected = tensors(await infer(client, "causal", infer_body(SMALL, {})))
    json_in = infer_body(SMALL, {"binary_data_output": True})
    response = await client.post("/v2/models/causal/infer", json=json_in)
    _, arrays = read_binary_answer(response)

    spec, raw = binary_input(SMALL)
    body, headers = binary_request({"inputs": [spec]}, raw)
    json_out = await client.post("/v2/models/causal/infer", content=body, headers=headers)

    assert json_out.status_code == 200 and json_out.headers["content-type"] == "application/json"
    for name, array in expected.items():
        np.testing.assert_array_equal(arrays[name], array.astype(np.float32))
        np.testing.assert_array_equal(tensors(json_out.json())[name], array)


@pytest.mark.parametrize("datatype", ["FP64", "FP16"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_fp64_and_fp16_inputs_are_converted_to_float32(client, datatype, binary):
    """The same numbers as the float32 input their values round to."""
    values = SMALL.astype({"FP64": np.float64, "FP16": np.float16}[datatype])
    if binary:
        spec, raw = binary_input(values, datatype)
        body, headers = binary_request({"inputs": [spec]}, raw)
        response = await client.post("/v2/models/causal/infer", content=body, headers=headers)
    else:
        request = infer_body(values.astype(np.float64), {})
        request["inputs"][0]["datatype"] = datatype
        response = await client.post("/v2/models/causal/infer", json=request)
    expected = await infer(client, "causal", infer_body(values.astype(np.float32), {}))

    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == expected["outputs"]


async def test_a_large_binary_answer_is_sent_in_views_of_the_arrays(client, monkeypatch):
    """No whole-answer copy: the parts after the header are views of the computed arrays."""
    from service.routes import inference_protocol

    parts: list[Any] = []
    real = inference_protocol.binary_parts

    def recording(header, raw):
        for part in real(header, raw):
            parts.append(part)
            yield part

    monkeypatch.setattr(inference_protocol, "binary_parts", recording)
    monkeypatch.setattr(inference_protocol, "BINARY_PART_BYTES", 4096)
    array = RNG.standard_normal((2, 64, 8)).astype(np.float32)
    spec, raw = binary_input(array)
    body, headers = binary_request(
        {"inputs": [spec], "parameters": {"binary_data_output": True, "num_heads": 4}}, raw
    )
    response = await client.post("/v2/models/multi-head/infer", content=body, headers=headers)

    assert response.status_code == 200, response.text
    _, arrays = read_binary_answer(response)
    assert arrays["attention_weights"].shape == (2, 4, 64, 64)
    assert isinstance(parts[0], bytes)  # the header
    assert all(isinstance(part, memoryview) for part in parts[1:])
    assert max(len(part) for part in parts[1:]) == 4096
    assert len(parts) == 1 + 2 * 4 * 64 * 64 * 4 // 4096 + 1  # the weights, then the context


BAD_BINARY = {
    "header past the end": (
        lambda spec, raw: binary_request({"inputs": [spec]}, raw, length=10_000),
        "Inference-Header-Content-Length 10000 is past the body's end",
    ),
    "header length of letters": (
        lambda spec, raw: (
            binary_request({"inputs": [spec]}, raw)[0],
            {"Inference-Header-Content-Length": "ten"},
        ),
        "'ten' is not a whole number",
    ),
    "header that is not json": (
        lambda spec, raw: (b"{not json}" + raw, {"Inference-Header-Content-Length": "10"}),
        "the JSON header is not valid JSON",
    ),
    "header cut short": (
        lambda spec, raw: binary_request({"inputs": [spec]}, raw, length=20),
        "the JSON header is not valid JSON",
    ),
    "sizes short of the bytes sent": (
        lambda spec, raw: binary_request({"inputs": [spec]}, raw, b"\0" * 8),
        "add up to 112 bytes, but 120 bytes follow the JSON header",
    ),
    "a size past the bytes sent": (
        lambda spec, raw: binary_request({"inputs": [spec]}, raw[:-8]),
        "input 'embeddings': binary_data_size 112 runs past the body's end",
    ),
    "a shape whose count does not match its bytes": (
        lambda spec, raw: binary_request({"inputs": [{**spec, "shape": [7, 5]}]}, raw),
        "input 'embeddings': shape [7, 5] holds 35 numbers but its 112 bytes of FP32 hold 28",
    ),
    "a size that splits a number": (
        lambda spec, raw: binary_request(
            {"inputs": [{**spec, "parameters": {"binary_data_size": 110}}]}, raw[:110]
        ),
        "its 110 bytes are not a whole number of FP32 values (4 bytes each)",
    ),
    "data and binary data": (
        lambda spec, raw: binary_request({"inputs": [{**spec, "data": [1.0] * 28}]}, raw),
        "input 'embeddings' has both data and binary_data_size",
    ),
    "a negative size": (
        lambda spec, raw: binary_request(
            {"inputs": [{**spec, "parameters": {"binary_data_size": -4}}]}, raw
        ),
        "binary_data_size must be at least 0; got -4",
    ),
    "a non-finite number": (
        lambda spec, raw: binary_request(
            {"inputs": [spec]}, np.full(28, np.inf, dtype="<f4").tobytes()
        ),
        "input 'embeddings' at [0][0]",
    ),
}


@pytest.mark.parametrize(("make", "expected"), BAD_BINARY.values(), ids=list(BAD_BINARY))
async def test_bad_binary_data_is_a_400_naming_what_is_wrong(client, make, expected):
    spec, raw = binary_input(SMALL)  # 7 x 4 FP32: 112 bytes
    body, headers = make(spec, raw)

    response = await client.post("/v2/models/causal/infer", content=body, headers=headers)

    assert response.status_code == 400, response.text
    assert list(response.json()) == ["error"]
    assert expected in response.json()["error"], response.json()["error"]
    # The service is unharmed: the next request is answered.
    assert (await client.post("/v2/models/causal/infer", json=infer_body(SMALL, {}))).is_success


async def test_the_body_limit_covers_binary_bodies():
    async with client_of(protocol_app(Settings(max_body_bytes=1000))) as client:
        spec, raw = binary_input(LARGE)
        body, headers = binary_request({"inputs": [spec]}, raw)
        response = await client.post("/v2/models/causal/infer", content=body, headers=headers)

    assert response.status_code == 413
    assert "ATTENTION_MAX_BODY_BYTES" in response.json()["error"]


# --- the OpenAPI document -----------------------------------------------------------------------


async def test_openapi_documents_each_models_inference_and_its_examples_work(client):
    openapi = (await client.get("/openapi.json")).json()
    paths = openapi["paths"]

    for path in [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/versions/{model_version}",
        "/v2/models/{model_name}/versions/{model_version}/ready",
    ]:
        assert "get" in paths[path], path
    for name in VARIANTS:
        for path in [f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/1/infer"]:
            operation = paths[path]["post"]
            assert {"200", "400", "404", "413", "415", "503"} <= set(operation["responses"])
            content = operation["responses"]["200"]["content"]
            assert {"application/json", "application/octet-stream"} <= set(content)
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            parameters = schema["properties"]["parameters"]["properties"]
            metadata = (await client.get(f"/v2/models/{name}")).json()
            assert set(parameters) == {*metadata["parameters"], "binary_data_output"}, path
            assert schema["properties"]["parameters"]["additionalProperties"] is False
            for key, example in operation["requestBody"]["content"]["application/json"][
                "examples"
            ].items():
                response = await client.post(path, json=example["value"])
                assert response.status_code == 200, (path, key, response.text)
    assert "/v2/models/{model_name}/infer" not in paths, "each model is documented on its own"
