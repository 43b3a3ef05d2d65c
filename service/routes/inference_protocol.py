"""The Open Inference Protocol over REST: `/v2/...`, as KServe's and Triton's clients call it.

A thin adapter over `service.protocol` (the models, every check, the answer) and
`service.pipeline` (where the work runs). Here: the body, in JSON or with Triton's binary tensor
data extension, and the answer written back in the form the request asked for.

Binary tensor data: a body whose JSON header is `Inference-Header-Content-Length` bytes long,
followed by the raw tensors of the inputs that say `parameters.binary_data_size`, in input order,
little-endian and row-major. An answer is binary for the outputs that ask
(`parameters.binary_data: true`) or for all of them (`parameters.binary_data_output: true`, what
tritonclient sends when it names no outputs): the JSON header, then each binary output's raw
bytes, with `Inference-Header-Content-Length` and each output's `binary_data_size`, as Triton
answers. JSON stays the default when nothing asks.

Every answer under `/v2` that is an error, whatever its cause, is `{"error": "..."}`.
"""

import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.responses import Response, StreamingResponse

from attention import VARIANTS, AttentionInputError, Variant
from service import pipeline, protocol
from service.concurrency import Saturated
from service.engine import Engine
from service.examples import EXAMPLES
from service.json_parts import dumps_or_parts
from service.parsing import as_float32, nesting_depth
from service.pipeline import Plan
from service.protocol import (
    INPUT,
    Answer,
    InferenceRequest,
    InputTensor,
    ProtocolError,
    RequestedOutput,
)
from service.routes.attention import (
    answer_response,
    json_request_body,
    read_body,
    require_media_type,
)
from service.schemas import ParameterInfo

HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"
# Media types an inference request may come as: tritonclient's synchronous client names none,
# its asyncio client (aiohttp) says octet-stream for JSON and binary bodies alike.
REQUEST_MEDIA_TYPES = ("application/json", BINARY_MEDIA_TYPE)
STATUS = {"invalid": 400, "not_found": 404, "limit": 400}
# Raw bytes handed to the server per part of a large binary answer: views, never copies.
BINARY_PART_BYTES = 4 * 2**20
DATA_TYPES = {1: list[float], 2: list[list[float]], 3: list[list[list[float]]]}

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


class PathParamsRoute(APIRoute):
    """An operation called with its path parameters and the bare Request, without FastAPI's
    dependency solving (it costs more than the book's example). The endpoint's signature still
    documents the parameters."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request=request, **request.path_params)

        return handler


# --- the protocol's JSON objects, decoded strictly ------------------------------------------------

Scalar = bool | int | float | str


class JsonInput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[int | float]  # whole numbers: 2.0 is 2, as JSON Schema's integer
    datatype: str
    data: msgspec.Raw = msgspec.Raw(b"")  # empty: absent (binary data instead)
    parameters: dict[str, Scalar] = {}


class JsonOutput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Scalar] = {}


class JsonRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The protocol's request: a field is there or not, never null."""

    inputs: list[JsonInput]
    id: str | msgspec.UnsetType = msgspec.UNSET
    model_name: str | msgspec.UnsetType = msgspec.UNSET
    model_version: str | msgspec.UnsetType = msgspec.UNSET
    parameters: dict[str, Scalar] = {}
    outputs: list[JsonOutput] | msgspec.UnsetType = msgspec.UNSET


# --- documentation models (the answers are written by orjson, these describe them) ---------------


class ErrorResponse(BaseModel):
    error: str = Field(description="what went wrong, and what was expected")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    description: str
    book_section: str
    parameters: dict[str, ParameterInfo] = Field(
        description="what the inference request's `parameters` may hold, with defaults"
    )
    implementations: list[str] = Field(description="values of the `implementation` parameter")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | None] | None = Field(
        None,
        description="the tensor's numbers, flat in row-major order (null: a padded position); "
        "absent for a binary output",
    )
    parameters: dict[str, int] | None = Field(
        None, description="`binary_data_size`: the bytes of a binary output"
    )


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's `id`, when it had one")
    parameters: dict[str, Any] = Field(
        description="every parameter as resolved, and the KV cache's figures"
    )
    outputs: list[OutputTensor]


# --- errors --------------------------------------------------------------------------------------


def error_response(message: str, status_code: int, headers: dict[str, str] | None = None):
    return Response(
        orjson.dumps({"error": message}),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def protocol_errors(endpoint: Callable[..., Awaitable[Response]]):
    """Every way the endpoint can fail, answered in the protocol's form."""

    @functools.wraps(endpoint)
    async def answered(*args: Any, **kwargs: Any) -> Response:
        try:
            return await endpoint(*args, **kwargs)
        except ProtocolError as error:
            return error_response(str(error), STATUS[error.kind])
        except AttentionInputError as error:  # found computing (an overflow)
            return error_response(str(protocol.refusal(error)), 400)
        except HTTPException as error:  # the body's size or media type
            return error_response(str(error.detail), error.status_code)
        except Saturated as error:
            kwargs["request"].app.state.metrics.refused.inc()
            return error_response(str(error), 503, headers={"Retry-After": "1"})

    return answered


# --- health and metadata --------------------------------------------------------------------------


def is_ready(request: Request) -> bool:
    return bool(getattr(request.app.state, "ready", False))


# The models and their version, listed in the OpenAPI document (menus in /docs); any other is
# the protocol's 404 {"error"}, not a validation error.
ModelName = Annotated[
    str, Path(description="an attention variant", json_schema_extra={"enum": list(VARIANTS)})
]
ModelVersion = Annotated[
    str, Path(description="the model's version", json_schema_extra={"enum": [protocol.VERSION]})
]

NOT_READY = {"model": Ready, "description": "Not ready yet (the protocol's 4xx for false)"}
UNKNOWN_MODEL = {"model": ErrorResponse, "description": "No such model or version"}


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> Response:
    return json_response(
        {
            "name": "attention-service",
            "version": request.app.version,
            "extensions": ["binary_tensor_data"],
        }
    )


@router.get(
    "/health/live",
    summary="Server live",
    response_model=Live,
    responses={400: {"model": Live, "description": "The warm-up failed: restart it"}},
)
async def server_live(request: Request) -> Response:
    live = request.app.state.warm_up_error is None  # as /healthz
    return json_response({"live": live}, 200 if live else 400)


@router.get(
    "/health/ready", summary="Server ready", response_model=Ready, responses={400: NOT_READY}
)
async def server_ready(request: Request) -> Response:
    ready = is_ready(request)
    return json_response({"ready": ready}, 200 if ready else 400)


MODEL_READY_RESPONSES = {
    400: {"model": ModelReady, "description": "Not ready yet"},
    404: UNKNOWN_MODEL,
}


@protocol_errors
async def model_ready(request: Request, model_name: str, model_version: str | None = None):
    variant = protocol.model(model_name, model_version)
    ready = is_ready(request)
    return json_response({"name": variant.name, "ready": ready}, 200 if ready else 400)


@protocol_errors
async def model_metadata(request: Request, model_name: str, model_version: str | None = None):
    return json_response(protocol.metadata(protocol.model(model_name, model_version)))


async def documented_ready(request: Request, model_name: ModelName) -> Response:
    return await model_ready(request=request, model_name=model_name)


async def documented_versioned_ready(
    request: Request, model_name: ModelName, model_version: ModelVersion
) -> Response:
    return await model_ready(request=request, model_name=model_name, model_version=model_version)


async def documented_metadata(request: Request, model_name: ModelName) -> Response:
    return await model_metadata(request=request, model_name=model_name)


async def documented_versioned_metadata(
    request: Request, model_name: ModelName, model_version: ModelVersion
) -> Response:
    return await model_metadata(request=request, model_name=model_name, model_version=model_version)


for path, endpoint, summary, model, responses in [
    (
        "/models/{model_name}",
        documented_metadata,
        "Model metadata",
        ModelMetadata,
        {404: UNKNOWN_MODEL},
    ),
    (
        "/models/{model_name}/versions/{model_version}",
        documented_versioned_metadata,
        "Model metadata, of its one version",
        ModelMetadata,
        {404: UNKNOWN_MODEL},
    ),
    (
        "/models/{model_name}/ready",
        documented_ready,
        "Model ready",
        ModelReady,
        MODEL_READY_RESPONSES,
    ),
    (
        "/models/{model_name}/versions/{model_version}/ready",
        documented_versioned_ready,
        "Model ready, its one version",
        ModelReady,
        MODEL_READY_RESPONSES,
    ),
]:
    router.add_api_route(
        path,
        endpoint,
        methods=["GET"],
        route_class_override=PathParamsRoute,
        summary=summary,
        response_model=model,
        responses=responses,
    )


# --- reading an inference request -----------------------------------------------------------------


def header_length(request: Request, body_size: int) -> int | None:
    """The JSON header's length when the body carries binary tensor data, else None."""
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ProtocolError(f"Inference-Header-Content-Length {value!r} is not a whole number")
    length = int(value)
    if not 0 < length <= body_size:
        raise ProtocolError(
            f"Inference-Header-Content-Length {length} is past the body's end: the body is "
            f"{body_size} bytes"
        )
    return length


def decode(body: bytes | bytearray, header: int | None) -> InferenceRequest:
    """The request in `body`: a JSON object, then (with a header length) the binary tensors."""
    json_part = body if header is None else memoryview(body)[:header]
    if len(json_part) < 4096 and not bytes(json_part).strip():
        raise ProtocolError("the request body is empty: send an inference request object")
    try:
        request = msgspec.json.decode(json_part, type=JsonRequest)
    except msgspec.ValidationError as error:
        message, _, path = str(error).partition(" - at `")
        where = f" at {path.rstrip('`')}" if path else ""
        raise ProtocolError(f"invalid inference request{where}: {message}") from None
    except RecursionError:
        raise ProtocolError("the body nests lists or objects too deeply") from None
    except msgspec.DecodeError as error:
        what = "the JSON header" if header is not None else "the body"
        raise ProtocolError(f"{what} is not valid JSON: {error}") from None
    binary = memoryview(body)[header:] if header is not None else memoryview(b"")
    return InferenceRequest(
        inputs=binary_inputs(request.inputs, binary, header is not None),
        parameters=own_parameters(request.parameters, ("binary_data_output",)),
        outputs=requested_outputs(present(request.outputs)),
        binary_outputs=binary_flag(request.parameters, "binary_data_output", "parameters"),
        id=present(request.id),
        model_name=present(request.model_name),
        model_version=present(request.model_version),
    )


def present(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


def binary_flag(parameters: dict[str, Scalar], name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: {name} must be true or false; got {value!r}")
    return value


def own_parameters(parameters: dict[str, Scalar], extension: tuple[str, ...]) -> dict[str, Scalar]:
    """The parameters but the binary extension's, which this module reads itself."""
    return {name: value for name, value in parameters.items() if name not in extension}


def requested_outputs(outputs: list[JsonOutput] | None) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    requested = []
    for output in outputs:
        where = f"output {output.name!r}"
        extra = own_parameters(output.parameters, ("binary_data",))
        if extra:
            raise ProtocolError(
                f"{where}: unknown parameters {sorted(extra)}; it takes binary_data"
            )
        requested.append(
            RequestedOutput(output.name, binary_flag(output.parameters, "binary_data", where))
        )
    return requested


def binary_inputs(
    inputs: list[JsonInput], binary: memoryview, has_header: bool
) -> list[InputTensor]:
    """The inputs, each reading its numbers from its JSON `data` or its slice of the binary
    tensors; the slices must account for every byte after the header."""
    tensors, offset = [], 0
    for tensor in inputs:
        where = f"input {tensor.name!r}"
        shape = [whole(dim, f"{where}: shape") for dim in tensor.shape]
        extra = own_parameters(tensor.parameters, ("binary_data_size",))
        if extra:
            raise ProtocolError(
                f"{where}: unknown parameters {sorted(extra)}; an input takes binary_data_size"
            )
        size = tensor.parameters.get("binary_data_size")
        has_data = len(tensor.data) > 0
        if size is None:
            if not has_data:
                raise ProtocolError(f"{where} has no data and no binary_data_size")
            tensors.append(
                InputTensor(tensor.name, tensor.datatype, shape, json_values(tensor.data))
            )
            continue
        if has_data:
            raise ProtocolError(f"{where} has both data and binary_data_size: send one")
        if not has_header:
            raise ProtocolError(
                f"{where} has binary_data_size but the request has no "
                "Inference-Header-Content-Length header to say where its JSON ends"
            )
        size = whole(size, f"{where}: binary_data_size")
        if size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be at least 0; got {size}")
        if offset + size > len(binary):
            raise ProtocolError(
                f"{where}: binary_data_size {size} runs past the body's end: "
                f"{len(binary) - offset} bytes of binary data are left after the inputs before it"
            )
        tensors.append(
            InputTensor(
                tensor.name,
                tensor.datatype,
                shape,
                protocol.raw_values(binary[offset : offset + size]),
            )
        )
        offset += size
    if offset != len(binary):
        raise ProtocolError(
            f"the binary_data_size values add up to {offset} bytes, but {len(binary)} bytes "
            "follow the JSON header"
        )
    return tensors


def whole(value: Scalar, what: str) -> int:
    """A whole number, given as one (2) or with a zero fraction (2.0, as JSON Schema's
    integer allows)."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    raise ProtocolError(f"{what} must be whole numbers; got {value!r}")


def json_values(raw: msgspec.Raw):
    def values(tensor: InputTensor, dtype: np.dtype, where: str) -> np.ndarray:
        fragment = bytes(raw)
        shape = tensor.shape
        depth = nesting_depth(fragment)
        if depth not in (1, len(shape)):
            raise ProtocolError(
                f"{where}: data must be a list of numbers, flat in row-major order or nested "
                f"{len(shape)} deep as the shape {shape} is; got "
                + ("something else" if depth == 0 else f"lists nested {depth} deep")
            )
        try:
            numbers = msgspec.json.decode(fragment, type=DATA_TYPES[depth])
        except msgspec.ValidationError as error:
            message, _, path = str(error).partition(" - at `$")
            message = message.replace("`float`", "a number").replace("`array`", "a list")
            if message == "Number out of range":
                message = "number out of range: data must be finite float32 values"
            raise ProtocolError(f"{where}: data{path.rstrip('`')}: {message}") from None
        if depth == 1:
            protocol.checked_count(tensor, len(numbers), "data has")
            return np.asarray(numbers, dtype=np.float64)
        try:
            array = as_float32(numbers)
        except ValueError:
            raise ProtocolError(f"{where}: nested data must be rectangular") from None
        if list(array.shape) != shape:
            raise ProtocolError(
                f"{where}: nested data has shape {list(array.shape)} but shape says {shape}"
            )
        return array

    return values


# --- writing the answer ---------------------------------------------------------------------------


@dataclass
class Written:
    """An answer's body and the headers that go with it."""

    content: bytes | Iterator[bytes | memoryview]
    headers: dict[str, str] | None = None
    media_type: str = "application/json"


def write(plan: Plan, payloads: list[dict[str, Any]]) -> Written:
    """JSON straight from the numpy arrays (in parts when large, as the native answers are), or
    a JSON header and the binary outputs' own bytes."""
    done = protocol.answer(plan, payloads)
    if not any(output.binary for output, _ in done.outputs):
        response = head(done)
        response["outputs"] = [
            {**tensor_head(output, array), "data": array.ravel()} for output, array in done.outputs
        ]
        return Written(dumps_or_parts(response, plan.answer_floats))
    response = head(done)
    raw: list[memoryview] = []
    response["outputs"] = []
    for output, array in done.outputs:
        described = tensor_head(output, array)
        if output.binary:
            data = memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B")
            described["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            described["data"] = array.ravel()
        response["outputs"].append(described)
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    size = len(header) + sum(len(data) for data in raw)
    return Written(
        binary_parts(header, raw),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Length": str(size)},
        BINARY_MEDIA_TYPE,
    )


def head(done: Answer) -> dict[str, Any]:
    response: dict[str, Any] = {"model_name": done.model_name, "model_version": protocol.VERSION}
    if done.id is not None:
        response["id"] = done.id
    response["parameters"] = done.parameters
    return response


def tensor_head(output: RequestedOutput, array: np.ndarray) -> dict[str, Any]:
    return {"name": output.name, "datatype": protocol.OUTPUT_DATATYPE, "shape": list(array.shape)}


def binary_parts(header: bytes, raw: list[memoryview]) -> Iterator[bytes | memoryview]:
    """The header, then each output's bytes in views of at most BINARY_PART_BYTES: the arrays
    are sent as they lie in memory, never joined into one copy."""
    yield header
    for data in raw:
        for start in range(0, len(data), BINARY_PART_BYTES):
            yield data[start : start + BINARY_PART_BYTES]


def written_response(written: Written) -> Response:
    if written.headers is None:
        return answer_response(written.content)
    return StreamingResponse(
        written.content, headers=written.headers, media_type=written.media_type
    )


# --- inference ------------------------------------------------------------------------------------


def parse(engine: Engine, variant: Variant, request: Request, body: bytes | bytearray) -> Plan:
    return protocol.prepare(engine, variant, decode(body, header_length(request, len(body))))


@protocol_errors
async def infer(request: Request, model_name: str, model_version: str | None = None):
    variant = protocol.model(model_name, model_version)
    require_media_type(request.scope, REQUEST_MEDIA_TYPES, absent_allowed=True)
    engine: Engine = request.app.state.engine
    received = [await read_body(request, engine.settings.max_body_bytes)]
    written = await pipeline.run(
        engine,
        request.app.state.compute_slots,
        received,
        len(received[0]),
        functools.partial(parse, engine, variant, request),
        write,
    )
    return written_response(written)


# --- the inference operations, one documented per model -----------------------------------------


def infer_endpoint(model_name: str, model_version: str | None):
    async def endpoint(request: Request) -> Response:
        return await infer(request=request, model_name=model_name, model_version=model_version)

    return endpoint


def infer_examples(variant: Variant) -> dict[str, dict[str, Any]]:
    """The variant's native examples with embeddings, as inference requests (flat data)."""
    examples: dict[str, dict[str, Any]] = {}
    for key, example in EXAMPLES[variant.name].items():
        value = dict(example["value"])
        if "embeddings" not in value or "attention_mask" in value:  # one tensor, no mask
            continue
        array = np.asarray(value.pop("embeddings"), dtype=np.float32)
        request = {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "data": [float(x) for x in array.astype(np.float64).ravel().round(6)],
                }
            ],
            **({"parameters": value} if value else {}),
        }
        examples[key] = {"summary": example["summary"], "value": request}
    return examples


INFER_RESPONSES = {
    200: {
        "description": "The outputs: JSON, or with binary outputs a JSON header of "
        "Inference-Header-Content-Length bytes followed by their raw little-endian FP32 bytes",
        "content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    400: {"model": ErrorResponse, "description": "A request the model cannot run"},
    404: UNKNOWN_MODEL,
    413: {"model": ErrorResponse, "description": "The request body exceeds its limit"},
    415: {"model": ErrorResponse, "description": "A body that is neither JSON nor binary"},
    503: {"model": ErrorResponse, "description": "Saturated; see Retry-After"},
}


def infer_description(variant: Variant) -> str:
    return (
        f"{variant.description} One input, `embeddings`: shape [T, d_in] or [B, T, d_in], FP32 "
        "(FP64 and FP16 converted), data flat in row-major order or nested, or sent as binary "
        "tensor data (a JSON header of `Inference-Header-Content-Length` bytes, then the raw "
        "little-endian tensor, its size in the input's `parameters.binary_data_size`). The "
        "variant's parameters go in `parameters`. `outputs` may name `attention_weights` and/or "
        "`context_vectors` (the context vectors alone let the service use the fused kernel that "
        "never holds T x T), each in binary with `parameters.binary_data`, or all of them with "
        "the request's `binary_data_output`."
    )


for variant in VARIANTS.values():
    for path, version in [
        (f"/models/{variant.name}/infer", None),
        (f"/models/{variant.name}/versions/{protocol.VERSION}/infer", protocol.VERSION),
    ]:
        router.add_api_route(
            path,
            infer_endpoint(variant.name, version),
            methods=["POST"],
            route_class_override=PathParamsRoute,
            name=f"infer_{variant.name.replace('-', '_')}" + ("_versioned" if version else ""),
            summary=f"Inference: {variant.name}" + (f", version {version}" if version else ""),
            description=infer_description(variant),
            response_model=InferenceResponse,
            responses=INFER_RESPONSES,
            # The body's schema is made exact for the running settings by service.openapi.
            openapi_extra=json_request_body({"type": "object"}, infer_examples(variant)),
        )

# Any other model or version: the protocol's 404, from the same endpoint.
for path in ["/models/{model_name}/infer", "/models/{model_name}/versions/{model_version}/infer"]:
    router.add_api_route(
        path,
        infer,
        methods=["POST"],
        route_class_override=PathParamsRoute,
        include_in_schema=False,
    )
