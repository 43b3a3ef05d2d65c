"""The inference protocol over gRPC, as real clients speak it with their defaults:
tritonclient.grpc (synchronous and asyncio) and KServe's InferenceGRPCClient against the real
server, each answer the REST answer's numbers to the bit; errors as the clients report them;
the health service; and what no client can provoke on a healthy server (not ready, saturated),
against the service in process.
"""

from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from service.concurrency import ComputeSlots
from service.engine import Engine
from service.grpc_server import GrpcServer
from service.observability import Metrics
from service.settings import Settings
from tests.conftest import free_port, live_server, metric
from tests.test_protocol_clients import (
    BATCH,
    CASES,
    IDS,
    OUTPUTS,
    SINGLE,
    assert_bits,
    assert_kserve_gets_the_native_numbers,
    kserve,
    kserve_call,
    native,
    parameters_for,
    triton_input,
)

LIMITS = {"max_tokens": "64", "max_body_bytes": "200000"}


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    """(REST address, gRPC address) of one real server, with small limits to run into."""
    grpc_port = free_port()
    with live_server(grpc_port=str(grpc_port), **LIMITS) as rest:
        yield rest, f"127.0.0.1:{grpc_port}"


# --- tritonclient.grpc ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "implementation"), CASES, ids=IDS)
@pytest.mark.parametrize("array", [SINGLE, BATCH], ids=["single", "batch"])
def test_tritonclient_grpc_gets_the_rest_numbers(servers, name, implementation, array):
    rest, address = servers
    parameters = parameters_for(name, implementation)
    client = triton.InferenceServerClient(address)

    result = client.infer(name, [triton_input(triton, array)], parameters=parameters)

    expected = native(rest, name, array, parameters)
    for output in OUTPUTS:
        assert_bits(result.as_numpy(output), expected[output], output)
    response = result.get_response()
    assert response.model_name == name and response.model_version == "1"
    assert len(response.raw_output_contents) == 2
    client.close()


def test_tritonclient_grpc_versions_outputs_ids_and_metadata(servers):
    rest, address = servers
    client = triton.InferenceServerClient(address)

    result = client.infer(
        "latent",
        [triton_input(triton, SINGLE)],
        model_version="1",
        outputs=[triton.InferRequestedOutput("context_vectors")],
        request_id="g-1",
        parameters={"latent_dim": 5},
    )

    assert result.get_response().id == "g-1"
    assert [output.name for output in result.get_response().outputs] == ["context_vectors"]
    expected = native(rest, "latent", SINGLE, {"latent_dim": 5, "return_weights": False})
    assert_bits(result.as_numpy("context_vectors"), expected["context_vectors"], "context")
    parameters = result.get_response().parameters
    assert parameters["latent_dim"].int64_param == 5
    assert parameters["kv_cache_values_per_token"].int64_param == 5
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sliding-window", "1")
    metadata = client.get_model_metadata("grouped-query")
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "grouped-query",
        ["1"],
        "pytorch",
    )
    assert [tensor.name for tensor in metadata.outputs] == list(OUTPUTS)
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    client.close()


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        (
            lambda c, x: c.infer("causal", [x], parameters={"dropout": 1.5}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameter 'dropout'",
        ),
        (
            lambda c, x: c.infer("transformer", [x]),
            grpc.StatusCode.NOT_FOUND,
            "unknown model 'transformer'",
        ),
        (
            lambda c, x: c.infer("causal", [x], model_version="7"),
            grpc.StatusCode.NOT_FOUND,
            "no version '7'",
        ),
        (
            lambda c, x: c.is_model_ready("causal", "7"),
            grpc.StatusCode.NOT_FOUND,
            "no version '7'",
        ),
        (
            lambda c, x: c.infer("causal", [triton_input(triton, np.ones((65, 4), np.float32))]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "tokens = 65 exceeds the limit of 64 (ATTENTION_MAX_TOKENS)",
        ),
        (
            lambda c, x: c.infer(
                "causal", [triton_input(triton, np.ones((2, 60, 500), np.float32))]
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
    ],
    ids=["invalid", "unknown model", "unknown version", "ready of no version", "limit", "size"],
)
def test_tritonclient_grpc_reports_the_status_and_the_rest_message(servers, call, code, words):
    client = triton.InferenceServerClient(servers[1])

    with pytest.raises(InferenceServerException) as raised:
        call(client, triton_input(triton, SINGLE))

    assert raised.value.status() == str(code)
    assert words in raised.value.message()
    client.close()


@pytest.mark.parametrize(("name", "implementation"), CASES, ids=IDS)
async def test_tritonclient_grpc_asyncio_gets_the_rest_numbers(servers, name, implementation):
    rest, address = servers
    parameters = parameters_for(name, implementation)
    client = triton_aio.InferenceServerClient(address)
    try:
        for array in (SINGLE, BATCH):
            inputs = [triton_input(triton_aio, array)]
            result = await client.infer(name, inputs, parameters=parameters)
            expected = native(rest, name, array, parameters)
            for output in OUTPUTS:
                assert_bits(result.as_numpy(output), expected[output], output)
        with pytest.raises(InferenceServerException) as raised:
            await client.infer(name, [triton_input(triton_aio, SINGLE)], parameters={"x": 1})
        assert raised.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        assert "unknown parameters ['x']" in raised.value.message()
    finally:
        await client.close()


# --- KServe (in a process of its own: see tests/kserve_client.py) -----------------------------


def test_kserve_grpc_gets_the_rest_numbers(servers):
    rest, address = servers
    assert_kserve_gets_the_native_numbers("grpc", address, rest)


def test_kserve_grpc_reports_the_status_and_the_rest_message(servers):
    (answer,) = kserve(
        [kserve_call("grpc", servers[1], "grouped-query", SINGLE, parameters={"num_kv_groups": 3})]
    )

    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "num_kv_groups=3 does not divide num_heads=2" in answer["error"]["message"]


# --- health --------------------------------------------------------------------------------------


def test_the_health_service_says_serving_for_the_server_and_the_inference_service(servers):
    with grpc.insecure_channel(servers[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as raised:
            health.Check(health_pb2.HealthCheckRequest(service="elsewhere"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# --- in process: before ready, and saturated ----------------------------------------------------


@pytest.fixture
async def in_process() -> AsyncIterator[tuple[GrpcServer, SimpleNamespace, str]]:
    settings = Settings(grpc_port=free_port(), max_queued_computations=0)
    state = SimpleNamespace(
        engine=Engine(settings),
        compute_slots=ComputeSlots(1, 0),
        metrics=Metrics(),
        ready=False,
    )
    server = GrpcServer(settings, state, "0.1.0")
    await server.start()
    try:
        yield server, state, f"127.0.0.1:{settings.grpc_port}"
    finally:
        await server.stop(0)


def infer_request(array: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multi-head")
    request.inputs.add(name="embeddings", datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


async def test_not_ready_is_unavailable_and_not_serving_until_it_is(in_process):
    server, state, address = in_process
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")

        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        whole = health_pb2.HealthCheckRequest(service="")  # alive: for liveness probes
        assert (await health.Check(whole)).status == health_pb2.HealthCheckResponse.SERVING
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(SINGLE))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in raised.value.details()

        state.ready = True
        await server.set_serving(True)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        answer = await stub.ModelInfer(infer_request(SINGLE))
        assert [output.name for output in answer.outputs] == list(OUTPUTS)

    exposition = generate_latest(state.metrics.registry).decode()  # labels in name order
    calls = "attention_grpc_requests_total"
    assert metric(exposition, calls, code="UNAVAILABLE", method="ModelInfer") == 1
    assert metric(exposition, calls, code="OK", method="ModelInfer") == 1
    assert metric(exposition, calls, code="OK", method="Check") == 3


async def test_a_saturated_service_is_resource_exhausted(in_process):
    _, state, address = in_process
    state.ready = True
    state.compute_slots.admitted = state.compute_slots.capacity  # every slot taken
    large = np.ones((256, 64), np.float32)  # over the inline work limit: a slot is needed
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(large))

    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ATTENTION_MAX_CONCURRENT_COMPUTATIONS" in raised.value.details()


async def test_raw_contents_must_match_the_inputs_and_their_sizes(in_process):
    _, state, address = in_process
    state.ready = True
    two = infer_request(SINGLE)
    two.raw_input_contents.append(b"")
    short = infer_request(SINGLE)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    typed = pb.ModelInferRequest(model_name="causal")
    tensor = typed.inputs.add(name="embeddings", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    cases = [
        (two, "raw_input_contents has 2 entries for 1 inputs"),
        (short, "holds 48 numbers but its 188 bytes of FP32 hold 47"),
        (typed, "shape [2, 2] holds 4 numbers but fp32_contents has 3"),
    ]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in raised.value.details()
        tensor.contents.fp32_contents.append(4.0)  # typed contents, whole: answered
        assert len((await stub.ModelInfer(typed)).outputs) == 2
