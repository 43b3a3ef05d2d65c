"""The inference protocol as real clients speak it, with their defaults: tritonclient's HTTP
client (synchronous and asyncio) and KServe's InferenceRESTClient, against the real server.

With its defaults tritonclient sends the input as binary tensor data and asks for every output
in binary; KServe sends the model's name in the body. No `binary_data=False` anywhere: the
numbers must be the native route's, to the bit, as the clients decode them. KServe's client
runs in a process of its own (tests/kserve_client.py: its protocol messages and tritonclient's
cannot share one).
"""

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from attention import VARIANTS
from tests.conftest import live_server
from tests.contract import CAUSAL, MULTI_HEAD

CASES = [
    (name, implementation)
    for name, variant in VARIANTS.items()
    for implementation in (variant.implementation_names or [None])
]
IDS = [f"{name}:{implementation}" if implementation else name for name, implementation in CASES]
RNG = np.random.default_rng(7)
SINGLE = RNG.standard_normal((6, 8)).astype(np.float32)
BATCH = RNG.standard_normal((3, 5, 8)).astype(np.float32)
OUTPUTS = ("attention_weights", "context_vectors")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as address:
        yield address


def parameters_for(name: str, implementation: str | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    if name != "simplified":
        parameters |= {"d_out": 4, "seed": 11, "qkv_bias": implementation != "v1"}
    if name in CAUSAL:
        parameters["dropout"] = 0.5
    if name in MULTI_HEAD:
        parameters["num_heads"] = 2
    if implementation is not None:
        parameters["implementation"] = implementation
    own = {"grouped-query": {"num_kv_groups": 1}, "sliding-window": {"window_size": 2}}
    parameters |= own.get(name, {})
    if name == "latent":
        parameters["latent_dim"] = 3
    return parameters


def native(server: str, name: str, array: np.ndarray, parameters: dict[str, Any]):
    """The native route's outputs, as the float32 numbers its JSON writes."""
    response = httpx.post(
        f"http://{server}/attention/{name}", json={"embeddings": array.tolist(), **parameters}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    return {key: np.asarray(answer[key], dtype=np.float32) for key in OUTPUTS if key in answer}


def assert_bits(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape, what
    assert actual.tobytes() == expected.tobytes(), f"{what}: not the native answer's bits"


def triton_input(module, array: np.ndarray):
    """The embeddings input of tritonclient.http or .grpc (`module`), as their users make it:
    the default sends the tensor's bytes (binary tensor data, or gRPC's raw_input_contents)."""
    tensor = module.InferInput("embeddings", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


# --- tritonclient, synchronous -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "implementation"), CASES, ids=IDS)
@pytest.mark.parametrize("array", [SINGLE, BATCH], ids=["single", "batch"])
def test_tritonclient_gets_the_native_numbers(server, name, implementation, array):
    parameters = parameters_for(name, implementation)
    client = triton.InferenceServerClient(server)

    result = client.infer(name, [triton_input(triton, array)], parameters=parameters)

    expected = native(server, name, array, parameters)
    for output in OUTPUTS:
        assert_bits(result.as_numpy(output), expected[output], output)
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == "1"
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])
    client.close()


def test_tritonclient_with_model_version_1_and_named_outputs(server):
    client = triton.InferenceServerClient(server)
    outputs = [triton.InferRequestedOutput("context_vectors")]  # binary, by default

    result = client.infer(
        "multi-head",
        [triton_input(triton, SINGLE)],
        model_version="1",
        outputs=outputs,
        request_id="req-7",
        parameters={"num_heads": 4},
    )

    assert result.get_response()["id"] == "req-7"
    assert result.as_numpy("attention_weights") is None
    expected = native(server, "multi-head", SINGLE, {"num_heads": 4})
    assert_bits(result.as_numpy("context_vectors"), expected["context_vectors"], "context")
    client.close()


def test_tritonclient_reads_health_and_metadata(server):
    client = triton.InferenceServerClient(server)

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("latent") and client.is_model_ready("latent", "1")
    assert not client.is_model_ready("latent", "2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("grouped-query", "1")
    assert metadata["versions"] == ["1"]
    assert "num_kv_groups" in metadata["parameters"]
    client.close()


@pytest.mark.parametrize(
    ("call", "status", "words"),
    [
        (lambda c, x: c.infer("causal", [x], parameters={"d_out": 0}), "400", "'d_out'"),
        (lambda c, x: c.infer("transformer", [x]), "404", "unknown model 'transformer'"),
        (lambda c, x: c.infer("causal", [x], model_version="2"), "404", "no version '2'"),
        (
            lambda c, x: c.infer("grouped-query", [x], parameters={"num_kv_groups": 3}),
            "400",
            "num_kv_groups=3 does not divide num_heads=2",
        ),
        (
            lambda c, x: c.infer("causal", [x], parameters={"heads": 2}),
            "400",
            "unknown parameters ['heads']",
        ),
    ],
    ids=["out of range", "unknown model", "unknown version", "groups", "unknown parameter"],
)
def test_tritonclient_reports_the_servers_message(server, call, status, words):
    client = triton.InferenceServerClient(server)

    with pytest.raises(InferenceServerException) as raised:
        call(client, triton_input(triton, SINGLE))

    assert raised.value.status() == status
    assert words in raised.value.message()
    client.close()


def test_tritonclient_with_an_int32_input_hears_which_datatypes_are_taken(server):
    client = triton.InferenceServerClient(server)
    tensor = triton.InferInput("embeddings", [2, 2], "INT32")
    tensor.set_data_from_numpy(np.ones((2, 2), dtype=np.int32))

    with pytest.raises(InferenceServerException) as raised:
        client.infer("causal", [tensor])

    assert raised.value.status() == "400"
    assert "takes FP32, FP64, FP16" in raised.value.message()
    client.close()


# --- tritonclient, asyncio -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "implementation"), CASES, ids=IDS)
async def test_tritonclient_asyncio_gets_the_native_numbers(server, name, implementation):
    parameters = parameters_for(name, implementation)
    client = triton_aio.InferenceServerClient(server)
    try:
        for array in (SINGLE, BATCH):
            inputs = [triton_input(triton_aio, array)]
            result = await client.infer(name, inputs, parameters=parameters)
            expected = native(server, name, array, parameters)
            for output in OUTPUTS:
                assert_bits(result.as_numpy(output), expected[output], output)
        versioned = await client.infer(
            name, [triton_input(triton_aio, SINGLE)], model_version="1", parameters=parameters
        )
        assert versioned.get_response()["model_version"] == "1"
        with pytest.raises(InferenceServerException) as raised:
            await client.infer(name, [triton_input(triton_aio, SINGLE)], parameters={"x": 1})
        assert raised.value.status() == "400" and "unknown parameters ['x']" in str(raised.value)
    finally:
        await client.close()


# --- KServe --------------------------------------------------------------------------------------

KSERVE_CLIENT = Path(__file__).with_name("kserve_client.py")


def kserve(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KServe's client making these calls (see tests/kserve_client.py), in its own process."""
    result = subprocess.run(
        [sys.executable, str(KSERVE_CLIENT)],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def kserve_call(transport: str, address: str, name: str, array: np.ndarray, **extra: Any):
    return {
        "transport": transport,
        "address": address,
        "model": name,
        "shape": list(array.shape),
        "data": base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode(),
        "parameters": extra.pop("parameters", {}),
        **extra,
    }


def kserve_outputs(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        name: np.frombuffer(base64.b64decode(output["data"]), np.dtype(output["dtype"])).reshape(
            output["shape"]
        )
        for name, output in answer["outputs"].items()
    }


def assert_kserve_gets_the_native_numbers(transport: str, address: str, rest: str) -> None:
    """Every variant, single and batched, through KServe's client with its defaults."""
    cases = [(name, impl, array) for name, impl in CASES for array in (SINGLE, BATCH)]
    calls = [
        kserve_call(
            transport,
            address,
            name,
            array,
            parameters=parameters_for(name, impl),
            id=f"k-{index}",
        )
        for index, (name, impl, array) in enumerate(cases)
    ]
    for index, ((name, impl, array), answer) in enumerate(zip(cases, kserve(calls), strict=True)):
        assert "error" not in answer, (name, impl, answer)
        assert (answer["model_name"], answer["id"]) == (name, f"k-{index}")
        outputs = kserve_outputs(answer)
        assert list(outputs) == list(OUTPUTS)
        expected = native(rest, name, array, parameters_for(name, impl))
        for output in OUTPUTS:
            assert_bits(outputs[output], expected[output], f"{name}:{impl} {output}")


def test_kserve_gets_the_native_numbers(server):
    assert_kserve_gets_the_native_numbers("rest", server, server)


def test_kserve_reports_the_servers_message(server):
    out_of_range, other_model = kserve(
        [
            kserve_call("rest", server, "latent", SINGLE, parameters={"latent_dim": 0}),
            kserve_call("rest", server, "causal", SINGLE, path_model="multi-head"),
        ]
    )

    assert out_of_range["error"]["status"] == 400
    assert "parameter 'latent_dim'" in out_of_range["error"]["message"]
    assert other_model["error"]["status"] == 400
    assert (
        "the body names model 'causal' but the path names 'multi-head'"
        in other_model["error"]["message"]
    )
