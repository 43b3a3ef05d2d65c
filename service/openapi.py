"""The request bodies of the OpenAPI document, exact for the running settings: the native
operations' and the inference protocol's (in JSON; its binary form is in the operation's words).

Each native operation's body is a `oneOf` of the three inputs the service takes: a matrix of
embeddings (T x d_in), a batch of them (B x T x d_in, which alone may carry `attention_mask`),
or text. Each branch lists every field of the variant, `additionalProperties: false`; a field
that does not apply to that input may only be null, since a null is the field left out. What
JSON Schema can state is stated: exactly one input, non-empty lists, the settings' limits as
`maxItems`/`maximum`, the weights' names for each implementation and `qkv_bias`, the pairings
a variant refuses. What it cannot state (rectangular matrices, a mask shaped as the batch,
divisibility, token counts, products of sizes, the weights' shapes) is in the descriptions.

`tests/schemathesis_hooks.py` holds the generated positive cases to those described rules, and
`tests/test_fuzz.py` checks the document against the live server.
"""

import copy
from collections.abc import Callable
from functools import cache
from typing import Any

import orjson
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from attention import VARIANTS, AttentionInputError, Variant
from attention.parameters import parameter_shapes
from attention.registry import AttentionConfig
from service import protocol
from service.engine import Engine
from service.parsing import parse_request
from service.routes import inference_protocol
from service.routes.compare import prepare_all
from service.schemas import (
    EMBEDDINGS_PARAMETERS,
    TEXT_PARAMETERS,
    compare_model,
    request_model,
)
from service.settings import Settings

Schema = dict[str, Any]

# The least magnitude float32 rounds to infinity (half an ulp above its largest finite value):
# any number below it in magnitude is a finite float32, as the service requires.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
FINITE = {
    "type": "number",
    "exclusiveMinimum": -FLOAT32_OVERFLOW,
    "exclusiveMaximum": FLOAT32_OVERFLOW,
}
NULL = {"type": "null"}
INPUTS = ("embeddings", "text")
READING = (
    "A null, for any field, is the same as leaving the field out; an integer is any whole "
    "number (2.0 is 2). "
)


def nullable(schema: Schema) -> Schema:
    """`schema` or null, its annotations kept outside the alternatives."""
    notes = {key: schema.pop(key) for key in ("description", "default") if key in schema}
    return {"anyOf": [schema, NULL], **notes}


def only_null(reason: str) -> Schema:
    return {"type": "null", "description": f"{reason}; only null (left out) is accepted here"}


def matrix(settings: Settings) -> Schema:
    """T x d_in finite numbers, as lists of rows."""
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": settings.max_tokens,
        "items": {"type": "array", "minItems": 1, "maxItems": settings.max_dim, "items": FINITE},
    }


def weights(dimensions: int) -> Schema:
    """A matrix (2) or vector (1) of finite numbers, bare or as the `{"shape", "data"}` object
    a step comes as (whose `data` alone is read)."""
    bare: Schema = FINITE
    for _ in range(dimensions):
        bare = {"type": "array", "minItems": 1, "items": bare}  # every size is 1 or more
    return {"anyOf": [bare, {"type": "object", "required": ["data"], "properties": {"data": bare}}]}


@cache
def weight_names(variant: Variant, implementation: str | None, qkv_bias: bool) -> dict[str, Any]:
    """The weights `parameters` takes for this configuration, by name: their number of
    dimensions, or for the wrapper `{"heads": {name: dimensions}}`. Read off a tiny module
    built as the service builds it, so the document names what the service expects."""
    options = tuple((option.name, 1) for option in variant.options)
    config = AttentionConfig(2, 2, 1, 0, 0.0, qkv_bias, implementation, options)
    shapes = parameter_shapes(variant.build(config, torch.Generator()))

    def dimensions(named: dict[str, Any]) -> dict[str, Any]:
        return {
            name: dimensions(value[0]) if name == "heads" else len(value)
            for name, value in named.items()
        }

    return dimensions(shapes)


def weights_object(names: dict[str, Any]) -> Schema:
    properties = {
        name: {"type": "array", "minItems": 1, "items": weights_object(value)}
        if name == "heads"
        else weights(value)
        for name, value in names.items()
    }
    return {
        "type": "object",
        "required": list(names),
        "properties": properties,
        "additionalProperties": False,
    }


def configurations(variant: Variant) -> list[tuple[str | None, bool]]:
    """(implementation, qkv_bias) pairs the variant runs."""
    return [
        (implementation, qkv_bias)
        for implementation in variant.implementations
        for qkv_bias in (False, True)
        if not (implementation == "v1" and qkv_bias)
    ]


def is_value(name: str, value: Any, default: Any) -> Schema:
    """A condition: the field `name` has `value`, counting a field left out (or null) as its
    default."""
    if value == default:
        return {"properties": {name: {"enum": [value, None]}}}
    return {"required": [name], "properties": {name: {"const": value}}}


def configuration_rules(variant: Variant) -> list[Schema]:
    """The pairings the variant refuses, and which weights `parameters` takes for each
    configuration, as if/then rules on the whole body."""
    rules: list[Schema] = []
    if "v1" in variant.implementations:
        rules.append(
            {
                "not": {
                    "required": ["implementation", "qkv_bias"],
                    "properties": {"implementation": {"const": "v1"}, "qkv_bias": {"const": True}},
                },
                "description": "SelfAttention_v1 has no bias vectors: no qkv_bias with v1",
            }
        )
    if "parameters" in variant.parameters:
        default = variant.default_implementation
        for implementation, qkv_bias in configurations(variant):
            condition = is_value("qkv_bias", qkv_bias, False)
            if implementation is not None:
                condition = {
                    "allOf": [condition, is_value("implementation", implementation, default)]
                }
            names = weight_names(variant, implementation, qkv_bias)
            rules.append(
                {
                    "if": condition,
                    "then": {"properties": {"parameters": nullable(weights_object(names))}},
                }
            )
    return rules


# Fields whose bound is a setting, beyond their own range.
SETTING_MAXIMA = {
    "d_out": "max_dim",
    "num_heads": "max_heads",
    "num_kv_groups": "max_heads",  # it divides num_heads
    "embedding_dim": "max_dim",
    "context_length": "max_context_length",
}

# What each field must satisfy that JSON Schema cannot say, appended to its description.
RULES = {
    "embeddings": "Rectangular: every row as long as the first (and every item of a batch as "
    "long as the first). Each number a finite float32 (|x| < 2^128 - 2^103), and small enough "
    "that the computation stays within float32: scores of inputs of ~1e19 and more overflow "
    "it, which is refused.",
    "attention_mask": "B x T, as the batch of embeddings it goes with; every row with at least "
    "one 1. Its entries are 1 and 0 or the booleans.",
    "text": "Each text's GPT-2 tokens at most `context_length` and ATTENTION_MAX_TOKENS; the "
    "characters of all the texts together at most ATTENTION_MAX_TEXT_CHARS.",
    "d_out": "Divisible by `num_heads` where the heads split it (all multi-head variants but "
    "the `wrapper` implementation, whose d_out x num_heads is at most ATTENTION_MAX_DIM). When "
    "left out it is d_in, which must then divide the same way.",
    "num_kv_groups": "Divides `num_heads`.",
    "latent_dim": "Its default, max(16, d_out // 8), is held to ATTENTION_MAX_DIM too.",
    "parameters": "Each weight shaped for this input and configuration: `W_<name>` d_in x d_out "
    "of its layer (`W_key`, `W_value` of grouped-query: d_in x num_kv_groups x head_dim; "
    "`W_DKV` d_in x latent_dim, `W_UK`, `W_UV` latent_dim x d_out, `W_out_proj` d_out x d_out), "
    "`b_<name>` its layer's output size; the wrapper's `heads` one per head. Integers within "
    "64 bits; booleans are not numbers.",
}


# The variants' own parameters, by name.
OPTIONS = {option.name: option for variant in VARIANTS.values() for option in variant.options}


def default_beyond(name: str, default: Any, settings: Settings) -> str:
    """Why leaving the field out is refused under these settings ("" when it is not): its
    default lies beyond the setting's bound (a deployment smaller than the defaults)."""
    setting = SETTING_MAXIMA.get(name)
    option = OPTIONS.get(name)
    if option is not None and option.derive is not None:  # latent_dim: max(16, d_out // 8)
        limit = settings.max_dim
        if all(option.derive(d_out) > limit for d_out in range(1, limit + 1)):
            return f"its default exceeds ATTENTION_MAX_DIM={limit} for every d_out"
        return ""
    if setting is None or not isinstance(default, int):
        return ""
    limit = getattr(settings, setting)
    if default <= limit:
        return ""
    return f"its default, {default}, exceeds ATTENTION_{setting.upper()}={limit}"


def field_schema(name: str, pydantic_schema: Schema, settings: Settings) -> tuple[Schema, bool]:
    """One field's schema (pydantic's, null allowed, the setting's bound and the field's rules
    added), and whether it is required: when its default is beyond the settings' bound, leaving
    it out is refused."""
    schema = copy.deepcopy(pydantic_schema)
    schema.pop("title", None)
    alternatives = schema.pop("anyOf", None)
    if alternatives is not None:  # pydantic's `X | None`: keep X (nullable() adds null back),
        # with what the field adds outside the alternatives (an enum of items, say) over it
        (base,) = [alternative for alternative in alternatives if alternative != NULL]
        schema = {**base, **schema}
    if name in SETTING_MAXIMA or name == "latent_dim":
        limit = getattr(settings, SETTING_MAXIMA.get(name, "max_dim"))
        schema["maximum"] = min(schema.get("maximum", limit), limit)
    description = schema.get("description", "").rstrip(".")
    if name in RULES:
        description += f". {RULES[name]}"
    if name == "parameters":
        schema = {"type": "object"}
    refused = default_beyond(name, schema.get("default"), settings)
    if refused:
        schema.pop("default", None)
        schema["description"] = f"{description}. Required under these settings: {refused}."
        return schema, True
    schema["description"] = description
    return nullable(schema), False


def input_schemas(settings: Settings) -> dict[str, Schema]:
    batch = {
        "type": "array",
        "minItems": 1,
        "maxItems": settings.max_batch_size,
        "items": matrix(settings),
    }
    text = {"type": "string", "minLength": 1, "maxLength": settings.max_text_chars}
    mask = {
        "type": "array",
        "minItems": 1,
        "maxItems": settings.max_batch_size,
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": settings.max_tokens,
            "items": {"enum": [0, 1, True, False]},
        },
    }
    return {
        "matrix": {
            **matrix(settings),
            "description": "T x d_in: one row of numbers per token. " + RULES["embeddings"],
        },
        "batch": {
            **batch,
            "description": "B x T x d_in: a batch of sequences of the same length "
            "(`attention_mask` marks padding). " + RULES["embeddings"],
        },
        "text": {
            "anyOf": [
                text,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_batch_size,
                    "items": text,
                },
            ],
            "description": "Text to tokenize with GPT-2's BPE (`<|endoftext|>` allowed) and "
            "embed as chapter 2 does, or a list of texts: a batch, padded on the right to the "
            "longest (the answer's `padding_mask` says where). " + RULES["text"],
        },
        "attention_mask": nullable(
            {
                **mask,
                "description": "1 (or true) at real tokens, 0 (or false) at padding. Padded keys "
                "get no attention from any query; every number a padded position computes comes "
                "back as null. " + RULES["attention_mask"],
            }
        ),
    }


def body_schema(
    fields: dict[str, Schema],
    required: set[str],
    settings: Settings,
    rules: list[Schema],
    description: str,
) -> Schema:
    """The `oneOf` of the three inputs over `fields` (every field but the inputs), those in
    `required` required where they apply."""
    inputs = input_schemas(settings)
    shared = {
        name: schema
        for name, schema in fields.items()
        if name not in (*TEXT_PARAMETERS, *EMBEDDINGS_PARAMETERS)
    }
    text_only = {name: only_null("`text` input only") for name in TEXT_PARAMETERS}
    not_text = only_null("`embeddings` input only")
    branches = [
        {
            "title": "embeddings",
            "properties": {
                "embeddings": inputs["matrix"],
                "text": not_text,
                "attention_mask": only_null("a batch of `embeddings` only (B x T x d_in)"),
                **text_only,
            },
            "required": ["embeddings"],
        },
        {
            "title": "a batch of embeddings",
            "properties": {
                "embeddings": inputs["batch"],
                "text": not_text,
                "attention_mask": inputs["attention_mask"],
                **text_only,
            },
            "required": ["embeddings"],
        },
        {
            "title": "text",
            "properties": {
                "text": inputs["text"],
                "embeddings": only_null("`embeddings` input only, not with `text`"),
                "attention_mask": only_null("a batch of `embeddings` only"),
                **{name: fields[name] for name in TEXT_PARAMETERS},
            },
            "required": ["text"],
        },
    ]
    for branch in branches:
        branch["type"] = "object"
        branch["properties"] = {**branch["properties"], **shared}
        branch["required"] += [
            name
            for name in branch["properties"]
            if name in required and branch["properties"][name] is fields.get(name)
        ]
        branch["additionalProperties"] = False
    schema: Schema = {"description": description, "oneOf": branches}
    if rules:
        schema["allOf"] = rules
    return schema


LIMITS = (
    "A body of at most ATTENTION_MAX_BODY_BYTES bytes (413 beyond). Beyond each field's own "
    "bounds, batch x heads x T x T is at most ATTENTION_MAX_ATTENTION_FLOATS when the weights "
    "are held (returned, dropout, or steps), and the numbers of the answer (weights, context "
    "vectors, steps) at most ATTENTION_MAX_ANSWER_FLOATS; a 422 names each limit exceeded."
)


def own_fields(
    properties: dict[str, Schema], settings: Settings
) -> tuple[dict[str, Schema], set[str]]:
    """Every field but the inputs and the mask (which `input_schemas` describes), with those
    required under these settings."""
    fields: dict[str, Schema] = {}
    required: set[str] = set()
    for name, schema in properties.items():
        if name in INPUTS or name in EMBEDDINGS_PARAMETERS:
            continue
        fields[name], needed = field_schema(name, schema, settings)
        if needed:
            required.add(name)
    return fields, required


def request_schema(variant: Variant, settings: Settings) -> Schema:
    properties = request_model(variant).model_json_schema()["properties"]
    fields, required = own_fields(properties, settings)
    description = (
        "Exactly one input: `embeddings` (a matrix, or a batch with an optional "
        "`attention_mask`) or `text`, and the fields of this variant. " + READING + LIMITS
    )
    return body_schema(fields, required, settings, configuration_rules(variant), description)


def compare_rules() -> list[Schema]:
    """`implementation` belongs to a variant compared; v1 takes no qkv_bias."""
    rules = configuration_rules(VARIANTS["self-attention"])[:1]
    for variant in VARIANTS.values():
        if not variant.implementation_names:
            continue
        rules.append(
            {
                "if": {
                    "required": ["implementation", "variants"],
                    "properties": {"implementation": {"enum": variant.implementation_names}},
                },
                "then": {"properties": {"variants": {"contains": {"const": variant.name}}}},
                "description": f"implementation {' or '.join(variant.implementation_names)} "
                f"belongs to {variant.name}, which must then be compared",
            }
        )
    return rules


def compare_schema(settings: Settings) -> Schema:
    properties = compare_model().model_json_schema()["properties"]
    fields, required = own_fields(properties, settings)
    description = (
        "One input, as each variant's endpoint takes it, and the union of the variants' "
        "fields; each variant gets those that apply to it. `d_out` divides by `num_heads` and "
        "`num_kv_groups` divides `num_heads` when the variants that need it are compared. "
        + READING
        + LIMITS.replace("the answer", "all the answers together")
    )
    return body_schema(fields, required, settings, compare_rules(), description)


def request_bodies(settings: Settings) -> dict[str, Schema]:
    """Each operation's request body schema, by path: the native ones and the protocol's
    inference, one per model and version."""
    bodies = {
        f"/attention/{variant.name}": request_schema(variant, settings)
        for variant in VARIANTS.values()
    }
    bodies["/attention/compare"] = compare_schema(settings)
    for variant in VARIANTS.values():
        schema = infer_schema(variant, settings)
        bodies[f"/v2/models/{variant.name}/infer"] = schema
        bodies[f"/v2/models/{variant.name}/versions/{protocol.VERSION}/infer"] = schema
    return bodies


# --- the inference protocol's requests ------------------------------------------------------------


def scalar(schema: Schema) -> Schema:
    """A field's schema without its null: a protocol parameter is a scalar, never null."""
    alternatives = schema.get("anyOf")
    if alternatives is None or NULL not in alternatives:
        return schema
    notes = {key: value for key, value in schema.items() if key != "anyOf"}
    if notes.get("default", 0) is None:  # "left out": no default to state
        del notes["default"]
    (base,) = [alternative for alternative in alternatives if alternative != NULL]
    return {**base, **notes}


def input_tensor(settings: Settings) -> Schema:
    """The one input tensor, `embeddings`, its numbers given as JSON `data`."""
    tokens = {"type": "integer", "minimum": 1, "maximum": settings.max_tokens}
    width = {"type": "integer", "minimum": 1, "maximum": settings.max_dim}
    batch = {"type": "integer", "minimum": 1, "maximum": settings.max_batch_size}
    flat = {
        "type": "array",
        "minItems": 1,
        "maxItems": settings.max_batch_size * settings.max_tokens * settings.max_dim,
        "items": FINITE,
    }
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": [protocol.INPUT]},
            "shape": {
                "anyOf": [
                    {"type": "array", "prefixItems": [tokens, width], "items": False},
                    {"type": "array", "prefixItems": [batch, tokens, width], "items": False},
                ],
                "minItems": 2,
                "description": "[T, d_in], or a batch [B, T, d_in]",
            },
            "datatype": {
                "type": "string",
                "enum": list(protocol.INPUT_DATATYPES),
                "description": "FP64 and FP16 are converted to float32",
            },
            "data": {
                "anyOf": [
                    flat,
                    matrix(settings),
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": settings.max_batch_size,
                        "items": matrix(settings),
                    },
                ],
                "description": "the tensor's numbers: flat in row-major order, as many as the "
                "shape's product, or nested as the shape is. " + RULES["embeddings"],
            },
        },
    }


def infer_schema(variant: Variant, settings: Settings) -> Schema:
    """One model's inference request, as its endpoint reads it in JSON: its own parameters,
    scalars, with their bounds under these settings."""
    properties = request_model(variant).model_json_schema()["properties"]
    parameters: dict[str, Schema] = {}
    required: list[str] = []
    for name in protocol.parameter_names(variant):
        schema, needed = field_schema(name, properties[name], settings)
        parameters[name] = scalar(schema)
        if needed:
            required.append(name)
    parameters["binary_data_output"] = {
        "type": "boolean",
        "description": "every output in binary (Triton's binary tensor data extension)",
    }
    parameters_schema: Schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": parameters,
        "description": "the variant's parameters, as its native endpoint takes them. "
        "`return_weights` false goes with `outputs` that leave attention_weights out.",
    }
    if required:
        parameters_schema["required"] = required
    rules = configuration_rules(variant)[:1] if "v1" in variant.implementations else []
    if rules:
        parameters_schema["allOf"] = rules
    output = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": list(protocol.OUTPUTS)},
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"binary_data": {"type": "boolean"}},
            },
        },
    }
    return {
        "type": "object",
        "required": ["inputs", *(["parameters"] if required else [])],
        "additionalProperties": False,
        "description": "An inference request in JSON (or with binary tensor data: see the "
        "operation). " + LIMITS.replace("a 422", "a 400"),
        "properties": {
            "id": {"type": "string", "description": "echoed in the answer"},
            "model_name": {"type": "string", "enum": [variant.name]},
            "model_version": {"type": "string", "enum": [protocol.VERSION]},
            "parameters": parameters_schema,
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": input_tensor(settings),
            },
            "outputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": len(protocol.OUTPUTS),
                "items": output,
                "description": "the outputs to return, in this order, each once (all of them "
                "when absent)",
            },
        },
    }


def taken(engine: Engine, path: str, example: dict[str, Any]) -> bool:
    """Whether the service takes the example under its settings: a deployment with smaller
    limits than the book's examples need shows only those it would answer."""
    body = orjson.dumps(example["value"])
    try:
        if path == "/attention/compare":
            prepare_all(engine, body)
        elif path.startswith("/v2/"):
            variant = VARIANTS[path.split("/")[3]]
            protocol.prepare(engine, variant, inference_protocol.decode(body, None))
        else:
            variant = VARIANTS[path.removeprefix("/attention/")]
            engine.prepare(variant, parse_request(body, variant))
    except (RequestValidationError, AttentionInputError, protocol.ProtocolError):
        return False
    return True


def install(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` FastAPI's document with the exact request bodies for `settings`,
    and the examples the service takes under them."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            for path, schema in request_bodies(settings).items():
                body = document["paths"][path]["post"]["requestBody"]["content"]
                body["application/json"]["schema"] = schema
                examples = body["application/json"].get("examples", {})
                for key, example in list(examples.items()):
                    if not taken(app.state.engine, path, example):
                        del examples[key]
        return app.openapi_schema

    app.openapi = openapi
