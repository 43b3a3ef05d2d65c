"""The Open Inference Protocol (v2, as KServe and Triton speak it), over the same engine.

Each variant of the registry is a model. Its one input tensor is `embeddings`: FP32, shape
`[T, d_in]` or a batch `[B, T, d_in]`, data flat in row-major order or nested to the shape. Its
outputs are `attention_weights` and `context_vectors`. The variant's parameters (`d_out`,
`num_heads`, `seed`, ...) come as the request's `parameters`, validated exactly as the native
`POST /attention/{variant}` validates them, and the numbers are the native endpoint's. Errors
are the protocol's `{"error": "..."}`: 400 for a request the model cannot run, 404 for an
unknown model, 413 for a body over its limit, 503 when the service is saturated.
"""

import functools
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response

from attention import VARIANTS, AttentionInputError, Variant
from service import pipeline
from service.concurrency import Saturated
from service.engine import Engine
from service.examples import EXAMPLES
from service.json_parts import dumps_or_parts
from service.parsing import as_float32, checked_finite, nesting_depth
from service.pipeline import Plan
from service.routes.attention import (
    answer_response,
    json_request_body,
    read_body,
)
from service.schemas import (
    EMBEDDINGS_PARAMETERS,
    TEXT_PARAMETERS,
    ParameterInfo,
    request_model,
    variant_info,
)

PLATFORM = "pytorch"
DATATYPE = "FP32"
INPUT = "embeddings"
OUTPUTS = ("attention_weights", "context_vectors")
# Triton's binary tensor extension: accepted when off, refused when on (JSON data only here).
BINARY_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size")
DATA_TYPES = {1: list[float], 2: list[list[float]], 3: list[list[list[float]]]}

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


class PathParamsRoute(APIRoute):
    """An operation called with its path parameters and the bare Request, without FastAPI's
    dependency solving (as `OwnBodyRoute` does for the native endpoints: it costs more than the
    book's example). The endpoint's signature still documents the parameters."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request=request, **request.path_params)

        return handler


# --- the protocol's JSON objects, decoded strictly ------------------------------------------------

Scalar = bool | int | float | str


class RequestInput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[int]
    datatype: str
    data: msgspec.Raw
    parameters: dict[str, Scalar] = {}


class RequestOutput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Scalar] = {}


class InferenceRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[RequestInput]
    id: str | None = None
    parameters: dict[str, Scalar] = {}
    outputs: list[RequestOutput] | None = None


class ProtocolError(Exception):
    """An answer in the protocol's `{"error": ...}` form."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


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
    data: list[float] = Field(description="the tensor's numbers, flat in row-major order")


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = Field(None, description="the request's `id`, when it had one")
    parameters: dict[str, Any] = Field(description="every parameter as resolved")
    outputs: list[OutputTensor]


# --- health and metadata --------------------------------------------------------------------------


def error_response(message: str, status_code: int, headers: dict[str, str] | None = None):
    return Response(
        orjson.dumps({"error": message}),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def model(name: str) -> Variant:
    variant = VARIANTS.get(name)
    if variant is None:
        raise ProtocolError(f"unknown model {name!r}; models: {', '.join(VARIANTS)}", 404)
    return variant


def is_ready(request: Request) -> bool:
    return bool(getattr(request.app.state, "ready", False))


# The models, listed in the OpenAPI document (a menu in /docs); any other name is the protocol's
# 404 {"error"}, not a validation error.
ModelName = Annotated[
    str, Path(description="an attention variant", json_schema_extra={"enum": list(VARIANTS)})
]

NOT_READY = {"model": Ready, "description": "Not ready yet (the protocol's 4xx for false)"}
UNKNOWN_MODEL = {"model": ErrorResponse, "description": "No such model"}


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": "attention-service", "version": request.app.version, "extensions": []}
    )


@router.get("/health/live", summary="Server live", response_model=Live)
async def server_live() -> Response:
    return json_response({"live": True})


@router.get(
    "/health/ready", summary="Server ready", response_model=Ready, responses={400: NOT_READY}
)
async def server_ready(request: Request) -> Response:
    ready = is_ready(request)
    return json_response({"ready": ready}, 200 if ready else 400)


@router.get(
    "/models/{model_name}/ready",
    summary="Model ready",
    response_model=ModelReady,
    responses={400: {"model": ModelReady, "description": "Not ready yet"}, 404: UNKNOWN_MODEL},
)
async def model_ready(model_name: ModelName, request: Request) -> Response:
    try:
        variant = model(model_name)
    except ProtocolError as error:
        return error_response(str(error), error.status_code)
    ready = is_ready(request)
    return json_response({"name": variant.name, "ready": ready}, 200 if ready else 400)


def protocol_parameters(variant: Variant) -> list[str]:
    """The request parameters of a variant: the native fields but the inputs."""
    model_fields = request_model(variant).model_fields
    inputs = ("embeddings", "text", *TEXT_PARAMETERS, *EMBEDDINGS_PARAMETERS)  # no batches here
    return [name for name in model_fields if name not in inputs]


def metadata(variant: Variant) -> dict[str, Any]:
    info = variant_info(variant)
    weights_shape = [-1, -1, -1] if variant.multi_head else [-1, -1]
    return {
        "name": variant.name,
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": DATATYPE, "shape": [-1, -1]}],
        "outputs": [
            {"name": "attention_weights", "datatype": DATATYPE, "shape": weights_shape},
            {"name": "context_vectors", "datatype": DATATYPE, "shape": [-1, -1]},
        ],
        "description": f"{variant.description} Book section {variant.book_section}. The input "
        "is T x d_in, or a batch B x T x d_in; a batch adds a leading B to every output"
        + (", and attention_weights is H x T x T" if variant.multi_head else "")
        + ".",
        "book_section": variant.book_section,
        "parameters": {
            name: parameter.model_dump()
            for name, parameter in info.parameters.items()
            if name in protocol_parameters(variant)
        },
        "implementations": [implementation.name for implementation in info.implementations],
    }


@router.get(
    "/models/{model_name}",
    summary="Model metadata: an attention variant's tensors and parameters",
    response_model=ModelMetadata,
    responses={404: UNKNOWN_MODEL},
)
async def model_metadata(model_name: ModelName) -> Response:
    try:
        return json_response(metadata(model(model_name)))
    except ProtocolError as error:
        return error_response(str(error), error.status_code)


# --- inference ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inference:
    """What the writer needs besides the job: the outputs asked for and the request's id."""

    outputs: tuple[str, ...]
    id: str | None


def decode(body: bytes | bytearray) -> InferenceRequest:
    if not body.strip():
        raise ProtocolError("the request body is empty: send an inference request object")
    try:
        return msgspec.json.decode(body, type=InferenceRequest)
    except msgspec.ValidationError as error:
        message, _, path = str(error).partition(" - at `")
        where = f" at {path.rstrip('`')}" if path else ""
        raise ProtocolError(f"invalid inference request{where}: {message}") from None
    except RecursionError:
        raise ProtocolError("the body nests lists or objects too deeply") from None
    except msgspec.DecodeError as error:
        raise ProtocolError(f"the body is not valid JSON: {error}") from None


def refuse_binary(parameters: dict[str, Scalar], where: str) -> dict[str, Scalar]:
    """Triton's binary-data parameters, which may say 'off'; the rest as they came."""
    for name in BINARY_PARAMETERS:
        if parameters.get(name) not in (None, False):
            raise ProtocolError(
                f"{where}: {name}={parameters[name]!r} asks for the binary tensor data "
                "extension, which this server does not support: send the data as JSON"
            )
    return {name: value for name, value in parameters.items() if name not in BINARY_PARAMETERS}


def embeddings(inputs: list[RequestInput]) -> np.ndarray:
    """The one input tensor as a float32 array of its shape, (T, d_in) or (B, T, d_in)."""
    names = [tensor.name for tensor in inputs]
    if names != [INPUT]:
        raise ProtocolError(
            f"the models take one input tensor, {INPUT!r} (FP32, shape [T, d_in] or "
            f"[B, T, d_in]); got {names or 'none'}"
        )
    (tensor,) = inputs
    where = f"input {INPUT!r}"
    extra = refuse_binary(tensor.parameters, where)
    if extra:
        raise ProtocolError(f"{where}: unknown parameters {sorted(extra)}; input tensors take none")
    if tensor.datatype != DATATYPE:
        raise ProtocolError(
            f"{where} has datatype {tensor.datatype!r}; this server takes {DATATYPE} only"
        )
    shape = tensor.shape
    if len(shape) not in (2, 3) or any(dim < 1 for dim in shape):
        raise ProtocolError(
            f"{where}: shape must be [T, d_in] or [B, T, d_in] with every dimension at least 1; "
            f"got {shape}"
        )
    raw = bytes(tensor.data)
    depth = nesting_depth(raw)
    if depth not in (1, len(shape)):
        raise ProtocolError(
            f"{where}: data must be a list of numbers, flat in row-major order or nested "
            f"{len(shape)} deep as the shape {shape} is; got "
            + ("something else" if depth == 0 else f"lists nested {depth} deep")
        )
    try:
        values = msgspec.json.decode(raw, type=DATA_TYPES[depth])
    except msgspec.ValidationError as error:
        message, _, path = str(error).partition(" - at `$")
        message = message.replace("`float`", "a number").replace("`array`", "a list")
        if message == "Number out of range":
            message = "number out of range: data must be finite float32 values"
        raise ProtocolError(f"{where}: data{path.rstrip('`')}: {message}") from None
    if depth == 1:
        expected = math.prod(shape)
        if len(values) != expected:
            raise ProtocolError(
                f"{where}: shape {shape} holds {expected} numbers but data has {len(values)}"
            )
        array = as_float32(values).reshape(shape)
    else:
        try:
            array = as_float32(values)
        except ValueError:
            raise ProtocolError(f"{where}: nested data must be rectangular") from None
        if list(array.shape) != shape:
            raise ProtocolError(
                f"{where}: nested data has shape {list(array.shape)} but shape says {shape}"
            )
    return checked_finite(array)


def wanted_outputs(requested: list[RequestOutput] | None) -> tuple[str, ...]:
    if requested is None:
        return OUTPUTS
    names: list[str] = []
    for output in requested:
        if output.name not in OUTPUTS:
            raise ProtocolError(f"unknown output {output.name!r}; outputs: {', '.join(OUTPUTS)}")
        if output.name in names:
            raise ProtocolError(f"output {output.name!r} is requested twice")
        extra = refuse_binary(output.parameters, f"output {output.name!r}")
        if extra:
            raise ProtocolError(f"output {output.name!r}: unknown parameters {sorted(extra)}")
        names.append(output.name)
    if not names:
        raise ProtocolError(f"'outputs' is empty: name at least one of {', '.join(OUTPUTS)}")
    return tuple(names)


def describe(errors: list[dict[str, Any]]) -> str:
    """A RequestValidationError's entries, located as a protocol client names things."""
    messages = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        if not loc:
            messages.append(error["msg"])
        elif loc[0] == "embeddings":
            at = " at " + "".join(f"[{index}]" for index in loc[1:]) if loc[1:] else ""
            messages.append(f"input {INPUT!r}{at}: {error['msg']}")
        else:
            messages.append(f"parameter {loc[0]!r}: {error['msg']}")
    return "; ".join(messages)


def prepare(engine: Engine, variant: Variant, body: bytes | bytearray) -> Plan:
    """From the body to a job checked against every limit, or a ProtocolError."""
    try:
        inference = decode(body)
        array = embeddings(inference.inputs)
        outputs = wanted_outputs(inference.outputs)
        parameters = refuse_binary(inference.parameters, "parameters")
        accepted = protocol_parameters(variant)
        unknown = sorted(name for name in parameters if name not in accepted)
        if unknown:
            raise ProtocolError(
                f"unknown parameters {unknown} for model {variant.name!r}; it accepts: "
                + ", ".join(accepted)
            )
        weights_wanted = "attention_weights" in outputs
        if parameters.get("return_weights") is False and weights_wanted:
            raise ProtocolError(
                "parameter 'return_weights' is false but the attention_weights output is "
                "requested: request only context_vectors, or drop the parameter"
            )
        values: dict[str, Any] = {"return_weights": weights_wanted, **parameters, INPUT: array}
        try:
            validated = request_model(variant).model_validate(values)
        except ValidationError as error:
            raise ProtocolError(
                describe(error.errors(include_url=False, include_context=False))
            ) from None
        job = engine.prepare(variant, validated)
    except RequestValidationError as error:
        raise ProtocolError(describe(list(error.errors()))) from None
    except AttentionInputError as error:
        message = f"parameter {error.field!r}: {error}" if error.field else str(error)
        raise ProtocolError(message) from None
    return Plan([job], Inference(outputs, inference.id))


def write(plan: Plan, payloads: list[dict[str, Any]]) -> bytes | Iterator[bytes]:
    """The protocol's response, written straight from the numpy arrays (in parts when it is
    large, as the native answers are: service.json_parts)."""
    (job,), (payload,), inference = plan.jobs, payloads, plan.extra
    config = {name: value for name, value in payload["config"].items() if value is not None}
    response: dict[str, Any] = {"model_name": job.variant.name}
    if inference.id is not None:
        response["id"] = inference.id
    response["parameters"] = config
    response["outputs"] = [
        {
            "name": name,
            "datatype": DATATYPE,
            "shape": list(payload[name].shape),
            "data": payload[name].ravel(),
        }
        for name in inference.outputs
    ]
    return dumps_or_parts(response, plan.answer_floats)


async def infer_content(request: Request, model_name: str) -> bytes | Iterator[bytes]:
    variant = model(model_name)
    engine: Engine = request.app.state.engine
    body = await read_body(request, engine.settings.max_body_bytes)
    parse = functools.partial(prepare, engine, variant)
    return await pipeline.run(
        engine, request.app.state.compute_slots, body, len(body), parse, write
    )


def infer_examples() -> dict[str, dict[str, Any]]:
    """The native examples with embeddings, as inference requests (flat row-major data)."""
    examples: dict[str, dict[str, Any]] = {}
    for variant_name, variant_examples in EXAMPLES.items():
        for key, example in variant_examples.items():
            value = dict(example["value"])
            if "embeddings" not in value or "attention_mask" in value:  # one tensor, no mask
                continue
            array = np.asarray(value.pop("embeddings"), dtype=np.float32)
            request = {
                "inputs": [
                    {
                        "name": INPUT,
                        "shape": list(array.shape),
                        "datatype": DATATYPE,
                        "data": [float(x) for x in array.astype(np.float64).ravel().round(6)],
                    }
                ],
                **({"parameters": value} if value else {}),
            }
            examples[f"{variant_name}_{key}"] = {
                "summary": f"{variant_name}: {example['summary']}",
                "value": request,
            }
    return examples


async def infer(model_name: ModelName, request: Request) -> Response:
    try:
        content = await infer_content(request, model_name)
    except ProtocolError as error:
        return error_response(str(error), error.status_code)
    except HTTPException as error:  # the body's size limit
        return error_response(str(error.detail), error.status_code)
    except Saturated as error:
        request.app.state.metrics.refused.inc()
        return error_response(str(error), 503, headers={"Retry-After": "1"})
    return answer_response(content)


# The protocol's inference request, as the endpoint reads it (see `decode`).
INFER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "additionalProperties": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "number"},
                    {"type": "boolean"},
                ]
            },
        },
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string", "enum": [INPUT]},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string", "enum": [DATATYPE]},
                    "data": {"type": "array"},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "enum": OUTPUTS}},
            },
        },
    },
}


router.add_api_route(
    "/models/{model_name}/infer",
    infer,
    methods=["POST"],
    route_class_override=PathParamsRoute,
    summary="Inference: an attention variant on the `embeddings` tensor",
    description="The model is the variant ("
    + ", ".join(f"`{name}`" for name in VARIANTS)
    + "). One input, `embeddings`: FP32, shape [T, d_in] or [B, T, d_in], data flat "
    "in row-major order or nested. The variant's parameters (`d_out`, `num_heads`, `seed`, "
    "`qkv_bias`, `dropout`, `implementation`, `return_weights`, `decimals`) go in `parameters`. "
    "`outputs` may name `attention_weights` and/or `context_vectors`; asking for the context "
    "vectors alone lets the service use the fused kernel that never holds T x T.",
    response_model=InferenceResponse,
    responses={
        400: {"model": ErrorResponse, "description": "A request the model cannot run"},
        404: UNKNOWN_MODEL,
        413: {"model": ErrorResponse, "description": "The request body exceeds its limit"},
        503: {"model": ErrorResponse, "description": "Saturated; see Retry-After"},
    },
    openapi_extra=json_request_body(INFER_SCHEMA, infer_examples()),
)
