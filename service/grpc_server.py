"""The inference protocol over gRPC: `inference.GRPCInferenceService`, and `grpc.health.v1.Health`
for Kubernetes' gRPC probes (the server, "", is SERVING while it runs; the inference service
once the app is ready), served beside the REST app in its process and event loop.

A thin adapter over `service.protocol` (the models, every check and message, the answer) and
`service.pipeline` (where the work runs, under the same compute slots as REST), so the numbers
are the REST answers', bit for bit. The messages and the service's stubs are the ones tritonclient
ships, generated from the protocol's own definitions (package `inference`), which KServe's
clients speak too.

Errors are gRPC status codes with the REST messages: INVALID_ARGUMENT for a request the model
cannot run, NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED for a limit (a
message over `ATTENTION_MAX_BODY_BYTES` included) or a saturated service, UNAVAILABLE while
the service is not ready.
"""

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from attention import AttentionInputError, Variant
from service import pipeline, protocol
from service.concurrency import Saturated
from service.engine import Engine
from service.pipeline import Plan
from service.protocol import InferenceRequest, InputTensor, ProtocolError, RequestedOutput
from service.schemas import request_model
from service.settings import Settings

SERVICE = "inference.GRPCInferenceService"
CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# The typed contents each input datatype may come in, when not as raw_input_contents.
TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


# --- messages to the protocol's request, and its answer to a message ---------------------------


def scalar(parameter: pb.InferParameter) -> protocol.Scalar:
    which = parameter.WhichOneof("parameter_choice")
    if which is None:
        raise ProtocolError("a parameter has no value")
    return getattr(parameter, which)


def typed_values(contents: pb.InferTensorContents):
    def values(tensor: InputTensor, dtype: np.dtype, where: str) -> np.ndarray:
        field = TYPED_CONTENTS.get(tensor.datatype)
        if field is None:
            raise ProtocolError(
                f"{where}: {tensor.datatype} comes only as raw_input_contents (gRPC has no "
                f"typed contents for it)"
            )
        numbers = getattr(contents, field)
        protocol.checked_count(tensor, len(numbers), f"{field} has")
        return np.asarray(numbers, dtype=np.float64)

    return values


def decode(message: pb.ModelInferRequest) -> InferenceRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: send "
            "one per input, in input order, or none"
        )
    inputs = []
    for index, tensor in enumerate(message.inputs):
        where = f"input {tensor.name!r}"
        unknown = sorted(set(tensor.parameters) - {"binary_data_size"})
        if unknown:
            raise ProtocolError(f"{where}: unknown parameters {unknown}; it takes binary_data_size")
        if "binary_data_size" in tensor.parameters:  # KServe's client says it; REST's sense
            size = scalar(tensor.parameters["binary_data_size"])
            if not raw or size != len(raw[index]):
                raise ProtocolError(
                    f"{where}: binary_data_size {size!r} is not the size of its "
                    f"raw_input_contents ({len(raw[index]) if raw else 'none sent'})"
                )
        values = protocol.raw_values(raw[index]) if raw else typed_values(tensor.contents)
        inputs.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), values))
    outputs = None
    if message.outputs:
        outputs = []
        for output in message.outputs:
            # binary_data asks REST for raw bytes; over gRPC every output is raw already.
            unknown = sorted(set(output.parameters) - {"binary_data"})
            if unknown:
                raise ProtocolError(
                    f"output {output.name!r}: unknown parameters {unknown}; it takes binary_data"
                )
            outputs.append(RequestedOutput(output.name))
    return InferenceRequest(
        inputs=inputs,
        parameters={name: scalar(value) for name, value in message.parameters.items()},
        outputs=outputs,
        id=message.id or None,
    )


def parameter(value: protocol.Scalar) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def write(plan: Plan, payloads: list[dict[str, Any]]) -> pb.ModelInferResponse:
    done = protocol.answer(plan, payloads)
    response = pb.ModelInferResponse(
        model_name=done.model_name, model_version=protocol.VERSION, id=done.id or ""
    )
    for name, value in done.parameters.items():
        response.parameters[name].CopyFrom(parameter(value))
    for output, array in done.outputs:
        response.outputs.add(
            name=output.name, datatype=protocol.OUTPUT_DATATYPE, shape=list(array.shape)
        )
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return response


def parse(engine: Engine, variant: Variant, message: pb.ModelInferRequest) -> Plan:
    request = decode(message)
    request.parameters = with_numbers(variant, request.parameters)
    return protocol.prepare(engine, variant, request)


def with_numbers(variant: Variant, parameters: dict[str, protocol.Scalar]):
    """KServe's InferParameter has no double: its clients send a fraction (`dropout`) as a
    string. Such a string becomes the number it spells where the parameter is one."""
    fields = request_model(variant).model_fields
    converted = dict(parameters)
    for name, value in parameters.items():
        if isinstance(value, str) and name in fields and fields[name].annotation is float:
            with contextlib.suppress(ValueError):  # else left for the validation to name
                converted[name] = float(value)
    return converted


# --- the service ---------------------------------------------------------------------------------


def tensor_metadata(tensors: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
        )
        for tensor in tensors
    ]


def answered(method: Callable[..., Any]):
    """The method's ProtocolError and Saturated as gRPC status codes, with their messages."""

    @functools.wraps(method)
    async def call(self: "InferenceService", request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ProtocolError as error:
            await context.abort(CODES[error.kind], str(error))
        except AttentionInputError as error:  # found computing (an overflow)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(protocol.refusal(error)))
        except Saturated as error:
            self.state.metrics.refused.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))

    return call


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The six calls of the protocol; the rest of Triton's service answer UNIMPLEMENTED."""

    def __init__(self, state: Any, version: str) -> None:
        self.state = state  # the app's: engine, compute slots, metrics, ready
        self.version = version

    def ready(self) -> bool:
        return bool(getattr(self.state, "ready", False))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=getattr(self.state, "warm_up_error", None) is None)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="attention-service", version=self.version, extensions=["binary_tensor_data"]
        )

    @answered
    async def ModelReady(self, request, context):
        protocol.model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.ready())

    @answered
    async def ModelMetadata(self, request, context):
        metadata = protocol.metadata(protocol.model(request.name, request.version or None))
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=tensor_metadata(metadata["inputs"]),
            outputs=tensor_metadata(metadata["outputs"]),
        )

    @answered
    async def ModelInfer(self, request, context):
        if not self.ready():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the service is not ready: loading the encoding and embedding tables, or "
                "shutting down",
            )
        variant = protocol.model(request.model_name, request.model_version or None)
        engine: Engine = self.state.engine
        # grpc holds the message for the call's length anyway: nothing to free early.
        return await pipeline.run(
            engine,
            self.state.compute_slots,
            [request],
            request.ByteSize(),
            functools.partial(parse, engine, variant),
            write,
        )


class Counted(aio.ServerInterceptor):
    """Every unary call counted in the app's metrics, by method and status code."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, inner = details.method.rsplit("/", 1)[-1], handler.unary_unary

        async def counted(request, context):
            code = grpc.StatusCode.OK
            try:
                return await inner(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self.metrics.count_grpc(method, code.name)

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GrpcServer:
    """The gRPC server of one app: started and stopped by the app's lifespan."""

    def __init__(self, settings: Settings, state: Any, version: str) -> None:
        self.settings = settings
        self.health = health_aio.HealthServicer()
        limit = settings.max_body_bytes
        self.server = aio.server(
            interceptors=[Counted(state.metrics)],
            options=[
                ("grpc.max_receive_message_length", min(limit, 2**31 - 1)),
                ("grpc.max_send_message_length", -1),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(state, version), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        # SO_REUSEPORT, gRPC's default on Linux: several workers share the port.
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as error:
            raise RuntimeError(
                f"cannot listen for gRPC on {address} (ATTENTION_GRPC_HOST, "
                f"ATTENTION_GRPC_PORT; 0 turns it off): {error}"
            ) from None

    async def start(self) -> None:
        """Listening at once: the server as a whole ("") is SERVING, for liveness; the
        inference service NOT_SERVING until `set_serving(True)`, for readiness."""
        await self.set_alive(True)
        await self.set_serving(False)
        await self.server.start()

    async def set_alive(self, alive: bool) -> None:
        status = health_pb2.HealthCheckResponse
        await self.health.set("", status.SERVING if alive else status.NOT_SERVING)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        await self.health.set(SERVICE, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
