"""The inference protocol as real clients speak it, with their defaults: tritonclient's HTTP
client (synchronous and asyncio) and KServe's InferenceRESTClient, against the real server.

With its defaults tritonclient sends the input as binary tensor data and asks for every output
in binary; KServe sends JSON with the model's name in the body. No `binary_data=False`
anywhere: the numbers must be the native route's, to the bit, as the clients decode them.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from attention import VARIANTS
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
    """The service as `make run` starts it, on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, "ATTENTION_ACCESS_LOG": "false"},
            stdout=log,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not become ready:\n{log.read().decode()[-4000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
        process.terminate()
        process.wait(30)


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
    return {key: np.asarray(response.json()[key], dtype=np.float32) for key in OUTPUTS}


def assert_bits(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape, what
    assert actual.tobytes() == expected.tobytes(), f"{what}: not the native answer's bits"


def triton_input(module, array: np.ndarray):
    tensor = module.InferInput("embeddings", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)  # the default: binary tensor data
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


def kserve_request(
    name: str, array: np.ndarray, parameters: dict[str, Any], request_id: str | None = None
) -> InferRequest:
    tensor = InferInput(name="embeddings", shape=list(array.shape), datatype="FP32")
    tensor.set_data_from_numpy(array)
    return InferRequest(
        model_name=name, infer_inputs=[tensor], parameters=parameters, request_id=request_id
    )


@pytest.mark.parametrize(("name", "implementation"), CASES, ids=IDS)
async def test_kserve_gets_the_native_numbers(server, name, implementation):
    parameters = parameters_for(name, implementation)
    client = InferenceRESTClient(config=RESTConfig(protocol="v2"))
    try:
        for array in (SINGLE, BATCH):
            request = kserve_request(name, array, parameters, request_id=f"k-{array.ndim}")
            response = await client.infer(f"http://{server}", request, model_name=name)
            expected = native(server, name, array, parameters)
            assert response.model_name == name
            assert response.id == f"k-{array.ndim}"
            for output in response.outputs:
                assert_bits(output.as_numpy(), expected[output.name], output.name)
            assert [output.name for output in response.outputs] == list(OUTPUTS)
    finally:
        await client.close()


async def test_kserve_reports_the_servers_message(server):
    client = InferenceRESTClient(config=RESTConfig(protocol="v2"))
    try:
        request = kserve_request("latent", SINGLE, {"latent_dim": 0})
        with pytest.raises(httpx.HTTPStatusError) as raised:
            await client.infer(f"http://{server}", request, model_name="latent")
        assert raised.value.response.status_code == 400
        assert "parameter 'latent_dim'" in str(raised.value)

        request = kserve_request("causal", SINGLE, {})
        with pytest.raises(httpx.HTTPStatusError) as raised:
            await client.infer(f"http://{server}", request, model_name="multi-head")
        assert raised.value.response.status_code == 400
        assert "the body names model 'causal' but the path names 'multi-head'" in str(raised.value)
    finally:
        await client.close()
