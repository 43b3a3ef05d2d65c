"""The Open Inference Protocol (v2, as KServe and Triton speak it), apart from its transports.

Each variant of the registry is a model, with one version, "1". Its one input tensor is
`embeddings`: shape `[T, d_in]` or a batch `[B, T, d_in]`, FP32 (FP64 and FP16 are accepted and
converted to float32). Its outputs are `attention_weights` and `context_vectors`, FP32. The
variant's parameters (`d_out`, `num_heads`, `seed`, ...) are the request's `parameters`,
validated exactly as the native `POST /attention/{variant}` validates them, and the numbers are
the native endpoint's.

The transports (`service.routes.inference_protocol` over REST, `service.grpc` over gRPC) decode
their requests into an `InferenceRequest` and write the `Answer` this module makes; every check
and every message is here, once. A `ProtocolError` carries its kind: `invalid` (REST 400,
gRPC INVALID_ARGUMENT), `not_found` (404, NOT_FOUND), `limit` (a limit of the settings: 400,
RESOURCE_EXHAUSTED).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from attention import VARIANTS, AttentionInputError, Variant
from service.engine import Engine
from service.parsing import checked_finite
from service.pipeline import Plan
from service.schemas import EMBEDDINGS_PARAMETERS, TEXT_PARAMETERS, request_model, variant_info

PLATFORM = "pytorch"
VERSION = "1"
INPUT = "embeddings"
OUTPUTS = ("attention_weights", "context_vectors")
OUTPUT_DATATYPE = "FP32"
# The input's datatypes, as the protocol names them, with their little-endian numpy dtypes.
INPUT_DATATYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2")}

Scalar = bool | int | float | str


class ProtocolError(Exception):
    """A request the protocol refuses; `kind` is `invalid`, `not_found` or `limit`."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


# --- models --------------------------------------------------------------------------------------


def model(name: str, version: str | None = None) -> Variant:
    """The variant a path names, or a not_found ProtocolError."""
    variant = VARIANTS.get(name)
    if variant is None:
        raise ProtocolError(f"unknown model {name!r}; models: {', '.join(VARIANTS)}", "not_found")
    if version is not None and version != VERSION:
        raise ProtocolError(
            f"model {name!r} has no version {version!r}; its one version is {VERSION!r}",
            "not_found",
        )
    return variant


# Native fields the protocol has no place for: it takes one tensor (no text, no batch to mask),
# and its parameters are scalars (no list of steps, no weights).
NOT_PARAMETERS = ("embeddings", "text", *TEXT_PARAMETERS, *EMBEDDINGS_PARAMETERS, "include")
NOT_PARAMETERS += ("parameters",)


def parameter_names(variant: Variant) -> list[str]:
    """The request parameters of a variant: its native scalar fields but the input's."""
    return [name for name in request_model(variant).model_fields if name not in NOT_PARAMETERS]


def metadata(variant: Variant) -> dict[str, Any]:
    """The protocol's model metadata, with the parameters a request may hold."""
    info = variant_info(variant)
    accepted = parameter_names(variant)
    weights_shape = [-1, -1, -1] if variant.multi_head else [-1, -1]
    return {
        "name": variant.name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [
            {"name": "attention_weights", "datatype": OUTPUT_DATATYPE, "shape": weights_shape},
            {"name": "context_vectors", "datatype": OUTPUT_DATATYPE, "shape": [-1, -1]},
        ],
        "description": f"{variant.description} Book section {variant.book_section}. The input "
        "is T x d_in, or a batch B x T x d_in (FP32; FP64 and FP16 are converted); a batch adds "
        "a leading B to every output"
        + (", and attention_weights is H x T x T" if variant.multi_head else "")
        + ".",
        "book_section": variant.book_section,
        "parameters": {
            name: parameter.model_dump()
            for name, parameter in info.parameters.items()
            if name in accepted
        },
        "implementations": [implementation.name for implementation in info.implementations],
    }


# --- requests ------------------------------------------------------------------------------------


@dataclass
class InputTensor:
    """An input as its transport found it; `values` gives its numbers, (prod(shape),) or
    shaped, in the datatype's dtype, checking their count against the shape."""

    name: str
    datatype: str
    shape: list[int]
    values: Callable[["InputTensor", np.dtype, str], np.ndarray]


@dataclass
class RequestedOutput:
    name: str
    binary: bool = False  # REST: Triton's binary tensor data extension


@dataclass
class InferenceRequest:
    inputs: list[InputTensor]
    parameters: dict[str, Scalar] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: all of them
    binary_outputs: bool = False  # for the outputs not named (binary_data_output)
    id: str | None = None
    model_name: str | None = None  # as the body says it, to agree with the path
    model_version: str | None = None


@dataclass(frozen=True)
class Inference:
    """What an answer needs besides the computed payload."""

    outputs: tuple[RequestedOutput, ...]
    id: str | None


def embeddings(inputs: list[InputTensor]) -> np.ndarray:
    """The one input tensor as a float32 array of its shape, (T, d_in) or (B, T, d_in)."""
    names = [tensor.name for tensor in inputs]
    if names != [INPUT]:
        raise ProtocolError(
            f"the models take one input tensor, {INPUT!r} (FP32, shape [T, d_in] or "
            f"[B, T, d_in]); got {names or 'none'}"
        )
    (tensor,) = inputs
    where = f"input {INPUT!r}"
    dtype = INPUT_DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ProtocolError(
            f"{where} has datatype {tensor.datatype!r}; this server takes "
            f"{', '.join(INPUT_DATATYPES)} (FP64 and FP16 converted to float32)"
        )
    shape = tensor.shape
    if len(shape) not in (2, 3) or any(dim < 1 for dim in shape):
        raise ProtocolError(
            f"{where}: shape must be [T, d_in] or [B, T, d_in] with every dimension at least 1; "
            f"got {shape}"
        )
    values = tensor.values(tensor, dtype, where)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range: named just below
        array = values.astype(np.float32).reshape(shape)
    try:
        return checked_finite(array)
    except RequestValidationError as error:
        raise ProtocolError(describe(list(error.errors()))) from None


def raw_values(raw: memoryview | bytes):
    """`InputTensor.values` for a tensor's raw little-endian bytes (binary tensor data over
    REST, raw_input_contents over gRPC)."""

    def values(tensor: InputTensor, dtype: np.dtype, where: str) -> np.ndarray:
        count, left = divmod(len(raw), dtype.itemsize)
        if left:
            raise ProtocolError(
                f"{where}: its {len(raw)} bytes are not a whole number of {tensor.datatype} "
                f"values ({dtype.itemsize} bytes each)"
            )
        checked_count(tensor, count, f"its {len(raw)} bytes of {tensor.datatype} hold")
        return np.frombuffer(raw, dtype=dtype)  # converted (copied) to float32 by the caller

    return values


def checked_count(tensor: InputTensor, count: int, what: str) -> None:
    expected = math.prod(tensor.shape)
    if count != expected:
        raise ProtocolError(
            f"input {tensor.name!r}: shape {tensor.shape} holds {expected} numbers but {what} "
            f"{count}"
        )


def wanted_outputs(request: InferenceRequest) -> tuple[RequestedOutput, ...]:
    if request.outputs is None:
        return tuple(RequestedOutput(name, request.binary_outputs) for name in OUTPUTS)
    names: list[str] = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise ProtocolError(f"unknown output {output.name!r}; outputs: {', '.join(OUTPUTS)}")
        if output.name in names:
            raise ProtocolError(f"output {output.name!r} is requested twice")
        names.append(output.name)
    if not names:
        raise ProtocolError(f"'outputs' is empty: name at least one of {', '.join(OUTPUTS)}")
    return tuple(request.outputs)


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


def prepare(engine: Engine, variant: Variant, request: InferenceRequest) -> Plan:
    """From a decoded request to a job checked against every limit, or a ProtocolError."""
    if request.model_name is not None and request.model_name != variant.name:
        raise ProtocolError(
            f"the body names model {request.model_name!r} but the path names {variant.name!r}"
        )
    if request.model_version not in (None, "", VERSION):
        raise ProtocolError(
            f"the body names version {request.model_version!r} of model {variant.name!r}, "
            f"whose one version is {VERSION!r}"
        )
    try:
        array = embeddings(request.inputs)
        outputs = wanted_outputs(request)
        parameters = request.parameters
        accepted = parameter_names(variant)
        unknown = sorted(name for name in parameters if name not in accepted)
        if unknown:
            raise ProtocolError(
                f"unknown parameters {unknown} for model {variant.name!r}; it accepts: "
                + ", ".join(accepted)
            )
        weights_wanted = any(output.name == "attention_weights" for output in outputs)
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
        errors = list(error.errors())
        limit = any(entry.get("type") == "limit_exceeded" for entry in errors)
        raise ProtocolError(describe(errors), "limit" if limit else "invalid") from None
    except AttentionInputError as error:
        raise refusal(error) from None
    return Plan([job], Inference(outputs, request.id))


def refusal(error: AttentionInputError) -> ProtocolError:
    """The library's refusal of an input, located as a protocol client names things."""
    if error.field == INPUT:
        return ProtocolError(f"input {INPUT!r}: {error}")
    return ProtocolError(f"parameter {error.field!r}: {error}" if error.field else str(error))


# --- answers -------------------------------------------------------------------------------------


@dataclass
class Answer:
    model_name: str
    id: str | None
    parameters: dict[str, Scalar]  # every parameter as resolved, and the KV cache's figures
    outputs: list[tuple[RequestedOutput, np.ndarray]]  # C-contiguous float32, in request order


def answer(plan: Plan, payloads: list[dict[str, Any]]) -> Answer:
    (job,), (payload,), inference = plan.jobs, payloads, plan.extra
    parameters = {name: value for name, value in payload["config"].items() if value is not None}
    for name, value in payload.get("kv_cache", {}).items():
        parameters[f"kv_cache_{name}"] = value
    return Answer(
        job.variant.name,
        inference.id,
        parameters,
        [(output, payload[output.name]) for output in inference.outputs],
    )
