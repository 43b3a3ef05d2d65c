"""Request and response models of the HTTP contract (shared/API.md).

Requests are validated with one pydantic model per variant, generated from the registry, so the
OpenAPI document shows each variant exactly the fields it accepts. Responses are serialised
straight from numpy arrays (see `service.responses`); the response models here document them.
"""

from functools import cache
from typing import Annotated, Any, Literal

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from attention import STEPS, VARIANTS, Variant

MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed

NUMBER_LISTS = {"type": "array", "items": {"type": "number"}}
MATRIX = {"type": "array", "items": NUMBER_LISTS}
BATCH = {"type": "array", "items": MATRIX}


def _decoded_embeddings(value: Any) -> np.ndarray:
    # `service.parsing` decodes the matrix from raw JSON before validation; anything else here
    # is a programming error, not a client's.
    if not isinstance(value, np.ndarray):
        raise ValueError("embeddings must be rows of numbers")
    return value


Embeddings = Annotated[
    np.ndarray,
    PlainValidator(_decoded_embeddings),
    WithJsonSchema(
        {
            "anyOf": [MATRIX, BATCH],
            "description": "T x d_in rows of finite numbers, one per token, or a batch "
            "B x T x d_in. Send exactly one of `embeddings` or `text`.",
        }
    ),
]


def _checked_text(value: Any) -> str | list[str]:
    if isinstance(value, str):
        if not value:
            raise PydanticCustomError(
                "string_too_short", "text is empty: send at least one character"
            )
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("string_type", "text must be a string or a list of strings")
    if not value:
        raise PydanticCustomError("too_short", "text is an empty list: send at least one string")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise PydanticCustomError(
                "string_type", "text[{index}] is not a string", {"index": index}
            )
        if not item:
            raise PydanticCustomError(
                "string_too_short",
                "text[{index}] is empty: every text needs a character",
                {"index": index},
            )
    return value


Text = Annotated[
    str | list[str],
    PlainValidator(_checked_text),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            ]
        }
    ),
]


def _checked_attention_mask(value: Any) -> np.ndarray:
    """(B, T) booleans, True at real tokens, from rows of 1/0 or true/false."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise PydanticCustomError(
            "list_type", "attention_mask must be a B x T list of rows of 1 (real) and 0 (padding)"
        )
    try:  # the common case in one pass of C; anything odd gets the loop's precise message
        mask = np.array(value)
    except ValueError:  # ragged
        mask = None
    well_formed = mask is not None and mask.ndim == 2 and mask.dtype.kind in "bif" and mask.size
    if well_formed and ((mask == 0) | (mask == 1)).all():
        return mask.astype(bool)
    width = len(value[0])
    for row_index, row in enumerate(value):
        if len(row) != width:
            raise PydanticCustomError(
                "value_error",
                "attention_mask must be rectangular: attention_mask[{row}] has {length} "
                "entries but attention_mask[0] has {width}",
                {"row": row_index, "length": len(row), "width": width},
            )
        for column, entry in enumerate(row):
            # `type(...) in` rather than isinstance: "1" is no mask value. 1.0 is 1, as JSON
            # Schema has it.
            if type(entry) not in (int, bool, float) or entry not in (0, 1):
                raise PydanticCustomError(
                    "value_error",
                    "attention_mask[{row}][{column}] is {entry}: use 1 (or true) for a real "
                    "token, 0 (or false) for padding",
                    {"row": row_index, "column": column, "entry": repr(entry)},
                )
    return np.array(value, dtype=bool).reshape(len(value), width)


AttentionMask = Annotated[
    np.ndarray,
    PlainValidator(_checked_attention_mask),
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "array", "items": {"enum": [0, 1, True, False]}},
        }
    ),
]


def whole(**bounds: int | None) -> Any:
    """An integer field within `bounds` (ge, le). Inside the Annotated type, so that the JSON
    schema states them as minimum and maximum even where the field is `| None`. A float with
    no fraction is made an int before validation (RequestBase.as_json_schema_reads_it)."""
    return Annotated[int, Field(**bounds)]


Seed = whole(ge=0, le=MAX_SEED)


def _holds_a_boolean(value: Any) -> bool:
    """Whether a weight, as lists of numbers, holds a boolean, which numpy would take as 1 or 0
    when it sits among numbers. Checked by C iteration over each innermost list."""
    if type(value) is bool:
        return True
    if type(value) is not list:
        return False
    if value and type(value[0]) is list:
        return any(_holds_a_boolean(row) for row in value)
    return bool in map(type, value)


def _weights_without_booleans(
    parameters: dict[str, Any], loc: tuple[Any, ...] = ("body", "parameters")
) -> dict[str, Any]:
    """Supplied weights are numbers: a boolean among them is refused, not read as 1 or 0.
    Their names and shapes are checked against the configuration later (service.engine).

    Raised as the 422 itself, rather than as pydantic's error, so that `loc` names the weight.
    """
    for name, value in parameters.items():
        if name == "heads" and type(value) is list:
            for index, head in enumerate(value):
                if isinstance(head, dict):
                    _weights_without_booleans(head, (*loc, name, index))
            continue
        data = value.get("data") if isinstance(value, dict) else value
        if _holds_a_boolean(data):
            error = {
                "type": "float_type",
                "loc": (*loc, name),
                "msg": f"{name} holds a boolean; weights are numbers",
            }
            raise RequestValidationError([error])
    return parameters


class RequestBase(BaseModel):
    """Fields every variant accepts."""

    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def as_json_schema_reads_it(cls, values: Any) -> Any:
        """Read the body as JSON Schema (and so the OpenAPI document) reads it:

        - a null is the field left out, whichever the field: a client generated from the
          document, where every field is optional, may send one for each it leaves unset
          (`"text": null` beside `embeddings`, say);
        - an integer field takes any whole number: JSON has one kind of number, and JSON
          Schema's `integer` is 2.0 as well as 2. 2.5, "2" and true are still refused (the
          models are strict).

        One pass over the values finds nothing to do in the common case.
        """
        if type(values) is not dict:
            return values
        for value in values.values():
            if value is None or type(value) is float:
                break
        else:
            return values
        return {
            name: int(value)
            if type(value) is float and name in INTEGER_FIELDS and value.is_integer()
            else value
            for name, value in values.items()
            if value is not None
        }

    embeddings: Embeddings | None = None
    text: Text | None = Field(
        None,
        description="Text to tokenize with GPT-2's BPE (`<|endoftext|>` allowed) and embed as "
        "chapter 2 does, or a list of texts: a batch, padded on the right to the longest one "
        "(the answer's `padding_mask` says where). Send exactly one of `embeddings` or `text`.",
    )
    attention_mask: AttentionMask | None = Field(
        None,
        description="for a batch of `embeddings` (B x T x d_in): B x T, 1 (or true) at real "
        "tokens, 0 (or false) at padding. Padded keys get no attention from any query; every "
        "number a padded position computes comes back as null. Each row needs a real token.",
    )
    return_weights: bool = Field(
        True,
        description="false leaves `attention_weights` out and lets the service use a fused "
        "kernel that never holds the T x T matrix",
    )
    decimals: whole(ge=0, le=8) | None = Field(
        None,
        description="round every number of the answer to this many decimals (the book prints 4)",
    )
    embedding_dim: whole(ge=1) = Field(
        256, description="`text` input: size of the token and positional embeddings (d_in)"
    )
    context_length: whole(ge=1) = Field(
        1024,
        description="`text` input: rows of the positional embedding table; more tokens is a 422",
    )
    embedding_seed: Seed = Field(123, description="`text` input: seed of the embedding tables")


# The integer fields of every model (a variant's own parameters are all whole numbers).
INTEGER_FIELDS = frozenset(
    (
        "decimals",
        "embedding_dim",
        "context_length",
        "embedding_seed",
        "d_out",
        "num_heads",
        "seed",
        *(option.name for variant in VARIANTS.values() for option in variant.options),
    )
)
TEXT_PARAMETERS = ("embedding_dim", "context_length", "embedding_seed")
EMBEDDINGS_PARAMETERS = ("attention_mask",)

# The variant parameters, each described once; a variant's model takes those it lists.
PARAMETER_FIELDS: dict[str, tuple[Any, Any]] = {
    "d_out": (
        whole(ge=1) | None,
        Field(
            None,
            description="output size of the query/key/value projections (per head for the "
            "wrapper, total for fused); defaults to d_in",
        ),
    ),
    "num_heads": (whole(ge=1), Field(2, description="number of attention heads")),
    "seed": (
        Seed,
        Field(
            123,
            description="weights initialised as `torch.manual_seed(seed)` and the book's "
            "constructor would; dropout masks continue the same stream",
        ),
    ),
    "qkv_bias": (bool, Field(False, description="bias in the query/key/value projections")),
    "parameters": (
        Annotated[dict[str, Any], AfterValidator(_weights_without_booleans)] | None,
        Field(
            None,
            description="weights to compute with instead of the seeded ones, named and shaped "
            'as `include: ["parameters"]` returns them (`x @ W` convention, W shaped '
            "d_in x d_out): `W_query`, `W_key`, `W_value`, `b_query`, `b_key`, `b_value` with "
            "`qkv_bias`, `W_out_proj`, `b_out_proj` for the fused multi-head class; the "
            'wrapper takes `{"heads": [one such object per head]}`. Each is a matrix (or '
            'vector) of numbers, or the `{"shape", "data"}` object a step comes as. '
            "`seed` still seeds the dropout masks, as `load_state_dict` after the seeded "
            "constructor would. A missing, unexpected or misshapen one is a 422 naming the "
            "expected names and shapes.",
            json_schema_extra={"additionalProperties": True},
        ),
    ),
    "dropout": (
        float,
        Field(
            0.0,
            ge=0.0,
            lt=1.0,
            description="dropout rate on the attention weights, applied as training-mode "
            "`nn.Dropout` does",
        ),
    ),
}

# Every variant's parameters: one another variant does not take is named as such in a 422.
ALL_PARAMETERS = (
    *PARAMETER_FIELDS,
    "implementation",
    *(option.name for variant in VARIANTS.values() for option in variant.options),
)


@cache
def request_model(variant: Variant) -> type[RequestBase]:
    """The request model of one variant: the common fields plus the parameters it accepts."""
    fields: dict[str, Any] = {
        name: PARAMETER_FIELDS[name] for name in variant.parameters if name in PARAMETER_FIELDS
    }
    for option in variant.options:
        bounded = whole(ge=option.minimum, le=option.maximum)
        fields[option.name] = (
            bounded if option.default is not None else bounded | None,
            Field(option.default, description=option.description),
        )
    if "implementation" in variant.parameters:
        choices = variant.implementation_names
        fields["implementation"] = (
            Literal[tuple(choices)],
            Field(
                variant.default_implementation,
                description="which of the book's classes: "
                + ", ".join(f"`{name}` ({variant.book_class(name)})" for name in choices),
            ),
        )
    fields["include"] = (
        list[str] | None,
        Field(
            None,
            description="intermediate tensors to return under `steps`, each as "
            '`{"shape": [...], "data": [...]}` (`parameters`: one such object per '
            'weight, or `{"heads": [...]}` for the wrapper). For this variant: '
            + ", ".join(f"`{name}`" for name in variant.step_names)
            + ". Batch axis as the input's; multi-head tensors per head (B, H, T, ...); `mask` "
            "is T x T booleans (True: may not attend); `scaled_scores` is the softmax's input, "
            "masked entries -inf, written null. Forces the explicit path (the fused kernel "
            "has no intermediates).",
            json_schema_extra={"items": {"type": "string", "enum": variant.step_names}},
        ),
    )
    title = "".join(part.capitalize() for part in variant.name.split("-"))
    return create_model(f"{title}Request", __base__=RequestBase, **fields)


# Fields of `POST /attention/compare` that no single variant's model has, and those it refuses.
COMPARE_ONLY = ("variants",)
NOT_COMPARED = ("parameters",)  # weights are shaped per variant: send them to one variant


@cache
def compare_model() -> type[RequestBase]:
    """Every variant's fields in one model, plus `variants`; each variant gets those it takes."""
    fields: dict[str, Any] = {}
    for variant in VARIANTS.values():
        for name, field in request_model(variant).model_fields.items():
            if name in RequestBase.model_fields or name in NOT_COMPARED or name in fields:
                continue
            fields[name] = (field.annotation, field)
    implementations = [
        name for variant in VARIANTS.values() for name in variant.implementation_names
    ]
    fields["implementation"] = (
        Literal[tuple(implementations)] | None,
        Field(
            None,
            description="passed to the variants that have this implementation "
            "(`v1`/`v2`: self-attention, `fused`/`wrapper`: multi-head); the others run their "
            "default",
        ),
    )
    fields["include"] = (
        list[str] | None,
        Field(
            None,
            description="steps to return (see each variant's `include`); each variant returns "
            "those of them that apply to it",
            json_schema_extra={"items": {"type": "string", "enum": list(STEPS)}},
        ),
    )
    fields["variants"] = (
        list[str] | None,
        Field(
            None,
            min_length=1,
            description="the variants to run, in this order; all of them when absent",
            json_schema_extra={"items": {"type": "string", "enum": list(VARIANTS)}},
        ),
    )
    return create_model("CompareRequest", __base__=RequestBase, **fields)


def accepted_fields(variant: Variant) -> list[str]:
    return list(request_model(variant).model_fields)


class Token(BaseModel):
    id: int = Field(description="GPT-2 token id")
    text: str = Field(description="the text this token decodes to")


class AttentionResponse(BaseModel):
    variant: str
    attention_weights: list[Any] | None = Field(
        None,
        description="T x T (batch B x T x T; multi-head H x T x T, batch B x H x T x T), after "
        "the causal mask and dropout where they apply; absent when `return_weights` is false",
    )
    context_vectors: list[Any] = Field(description="T x d (batch B x T x d)")
    tokens: list[Token] | list[list[Token]] | None = Field(
        None,
        description="only for `text` input: its tokens, or for a list of texts each one's "
        "(without padding)",
    )
    padding_mask: list[list[bool]] | None = Field(
        None,
        description="B x T, true at padded positions; only for a list of texts or an "
        "`attention_mask`. Padded keys get weight 0; every number a padded position computes "
        "(its row of weights, its context vector, its rows of steps) is null",
    )
    steps: dict[str, Any] | None = Field(
        None,
        description='the tensors `include` asked for, by name: `{"shape", "data"}` each',
    )
    config: dict[str, Any] = Field(description="every parameter as resolved")


class CompareResponse(BaseModel):
    answers: dict[str, AttentionResponse] = Field(
        description="each variant's answer, as its own endpoint gives it, by variant name"
    )


class ParameterInfo(BaseModel):
    default: Any
    description: str | None


class ImplementationInfo(BaseModel):
    name: str
    book_class: str | None
    default: bool


class VariantInfo(BaseModel):
    name: str
    path: str
    description: str
    book_section: str
    book_class: str | None
    causal: bool = Field(description="whether a query sees only itself and earlier tokens")
    parameters: dict[str, ParameterInfo]
    implementations: list[ImplementationInfo]


def variant_info(variant: Variant) -> VariantInfo:
    model = request_model(variant)
    return VariantInfo(
        name=variant.name,
        path=f"/attention/{variant.name}",
        description=variant.description,
        book_section=variant.book_section,
        book_class=variant.book_class(variant.default_implementation),
        causal="mask" in variant.steps,
        parameters={
            name: ParameterInfo(default=field.default, description=field.description)
            for name, field in model.model_fields.items()
            if name not in ("embeddings", "text")
        },
        implementations=[
            ImplementationInfo(
                name=name,
                book_class=variant.book_class(name),
                default=name == variant.default_implementation,
            )
            for name in variant.implementation_names
        ],
    )


class ErrorMessage(BaseModel):
    detail: str


class ValidationErrorItem(BaseModel):
    type: str = Field(description="what kind of problem, e.g. `extra_forbidden`, `limit_exceeded`")
    loc: list[str | int] = Field(description="where: `body`, then the field and any indices")
    msg: str = Field(description="what was expected and what came")
    input: Any = Field(None, description="the offending value, when it is short")
    ctx: dict[str, Any] | None = Field(None, description="for limits: limit, value, setting")


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]


VARIANT_NAMES = tuple(VARIANTS)
