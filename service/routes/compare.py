"""`POST /attention/compare`: one input, several variants, their answers side by side.

Each variant gets the request's fields that apply to it and no others: `num_heads` goes to the
multi-head variants only, `dropout` to the causal ones, a variant's own parameter
(`num_kv_groups`, say) to it alone, `implementation` to the variant that
has that implementation, `include` as the steps that variant has. Included in the app before the
attention router, whose `POST /attention/{variant}` answers 404 for unknown names.
"""

import functools
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from attention import STEPS, VARIANTS, Variant
from service import pipeline
from service.engine import Engine, Job, LimitCheck
from service.examples import BOOK_INPUTS, BOOK_SENTENCE, example
from service.json_parts import dumps_or_parts
from service.parsing import NotFast, body_error, careful_values, fast_values
from service.pipeline import Plan
from service.routes.attention import (
    ERROR_RESPONSES,
    JSON_MEDIA_TYPES,
    OwnBodyRoute,
    answer_response,
    json_request_body,
    read_body,
    require_media_type,
)
from service.schemas import (
    COMPARE_ONLY,
    CompareResponse,
    accepted_fields,
    compare_model,
    request_model,
)

EXAMPLES = {
    "book": example(
        "Book chapter 3: the six 3-d inputs through every variant, d_out 2, seed 123",
        {"embeddings": BOOK_INPUTS, "d_out": 2, "seed": 123, "decimals": 4},
    ),
    "steps": example(
        "Causal and multi-head side by side, with their queries and masks",
        {
            "embeddings": BOOK_INPUTS,
            "d_out": 2,
            "seed": 123,
            "variants": ["causal", "multi-head"],
            "include": ["queries", "mask"],
            "decimals": 4,
        },
    ),
    "text": example(
        "A sentence through every variant",
        {"text": BOOK_SENTENCE, "embedding_dim": 8, "decimals": 4},
    ),
}

router = APIRouter(tags=["attention"])


def validation_errors(error: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [
            body_error(e["loc"], e["msg"], e["type"], input=e.get("input"))
            for e in error.errors(include_url=False, include_context=False)
        ]
    )


def parse_compare(body: bytes | bytearray) -> list[tuple[Variant, Any]]:
    """(variant, its validated request) for each variant asked for, in the order asked."""
    try:
        values = fast_values(body)
    except NotFast:
        values = careful_values(body)
    model = compare_model()
    unknown = [name for name in values if name not in model.model_fields]
    if unknown:
        accepted = ", ".join(model.model_fields)
        raise RequestValidationError(
            [
                body_error(
                    (name,),
                    f"unknown field {name!r}; compare accepts: {accepted}"
                    + (
                        " (send parameters to one variant's endpoint)"
                        if name == "parameters"
                        else ""
                    ),
                    "extra_forbidden",
                )
                for name in unknown
            ]
        )
    try:
        request = model.model_validate(values)
    except ValidationError as error:
        raise validation_errors(error) from None
    names = list(dict.fromkeys(request.variants or VARIANTS))
    bad = [(i, name) for i, name in enumerate(names) if name not in VARIANTS]
    if bad:
        raise RequestValidationError(
            [
                body_error(
                    ("variants", i),
                    f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}",
                    "literal_error",
                )
                for i, name in bad
            ]
        )
    chosen = [VARIANTS[name] for name in names]
    unknown_steps = [(i, name) for i, name in enumerate(request.include or []) if name not in STEPS]
    if unknown_steps:
        raise RequestValidationError(
            [
                body_error(
                    ("include", i),
                    f"unknown step {name!r}; the steps are: {', '.join(STEPS)}",
                    "literal_error",
                )
                for i, name in unknown_steps
            ]
        )
    implementation = values.get("implementation")
    if implementation is not None and not any(
        implementation in variant.implementation_names for variant in chosen
    ):
        raise RequestValidationError(
            [
                body_error(
                    ("implementation",),
                    f"implementation {implementation!r} belongs to none of the variants "
                    f"compared ({', '.join(names)})",
                )
            ]
        )
    return [(variant, variant_request(variant, values)) for variant in chosen]


def variant_request(variant: Variant, values: dict[str, Any]) -> Any:
    accepted = set(accepted_fields(variant))
    own = {
        name: value
        for name, value in values.items()
        if name in accepted and name not in COMPARE_ONLY
    }
    if own.get("implementation") not in variant.implementation_names:
        own.pop("implementation", None)
    if own.get("include"):
        own["include"] = [name for name in own["include"] if name in variant.steps]
    try:
        return request_model(variant).model_validate(own)
    except ValidationError as error:  # cannot happen after compare_model; kept for safety
        raise validation_errors(error) from None


def prepare_all(engine: Engine, body: bytes | bytearray) -> Plan:
    jobs: list[Job] = []
    for variant, request in parse_compare(body):
        # One text, tokenized once for all the variants.
        jobs.append(engine.prepare(variant, request, jobs[0].tokens if jobs else None))
    # Each variant fits the limit on its own; the one answer holds them all.
    plan = Plan(jobs)
    limits = LimitCheck(engine.settings)
    limits.at_most(
        (),
        "numbers in the answer (all variants together)",
        plan.answer_floats,
        "max_answer_floats",
        hint="compare fewer variants or a shorter input",
    )
    limits.raise_if_any()
    return plan


def write_answers(plan: Plan, payloads: list[dict[str, Any]]) -> bytes | Iterator[bytes]:
    answers = {job.variant.name: payload for job, payload in zip(plan.jobs, payloads, strict=True)}
    return dumps_or_parts({"answers": answers}, plan.answer_floats)


async def compare(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    require_media_type(request.scope, JSON_MEDIA_TYPES)
    received = [await read_body(request, engine.settings.max_body_bytes)]
    parse = functools.partial(prepare_all, engine)
    content = await pipeline.run(
        engine, request.app.state.compute_slots, received, len(received[0]), parse, write_answers
    )
    return answer_response(content)


router.add_api_route(
    "/attention/compare",
    compare,
    methods=["POST"],
    route_class_override=OwnBodyRoute,
    name="attention_compare",
    summary="Several variants on one input, side by side",
    description="One input (embeddings or text) and shared parameters, run through each of "
    "`variants` (default: all). Each variant gets only the fields that apply to it: `num_heads` "
    "goes to the multi-head variants, `dropout` to the causal ones, "
    + ", ".join(f"`{o.name}`" for v in VARIANTS.values() for o in v.options)
    + " to the variant they belong to, `implementation` to the "
    "variant that has it, `include` as the steps the variant has; `parameters` is refused "
    "(weights are shaped per variant). The answers are those of each variant's own endpoint.",
    response_model=CompareResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=json_request_body(compare_model().model_json_schema(), EXAMPLES),
)
