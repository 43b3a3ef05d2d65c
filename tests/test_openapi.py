"""The OpenAPI document states the request contract exactly: bodies it admits, the service
answers; bodies it refuses, the service refuses. Each case below is a statement of docs/api.md,
checked against both the document (a JSON Schema validator) and the service.

tests/test_fuzz.py checks the same over thousands of generated bodies; these are the rules
written out, each able to fail on its own.
"""

from typing import Any

import httpx
import jsonschema
import pytest

from service.main import create_app
from service.settings import Settings
from tests.contract import VARIANTS

E4 = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]  # T 2, d_in 4
BATCH = [E4, E4]
WEIGHTS_4x4 = [[0.1] * 4] * 4
QKV = ("query", "key", "value")

# (variant, body, whether the contract admits it)
CASES: list[tuple[str, Any, bool]] = [
    ("causal", {"embeddings": E4}, True),
    ("causal", {"embeddings": BATCH}, True),
    ("causal", {"text": "Hi"}, True),
    ("causal", {"text": ["Hi", "there"]}, True),
    ("causal", {}, False),
    ("causal", [E4], False),
    ("causal", {"embeddings": []}, False),
    ("causal", {"embeddings": [[]]}, False),
    ("causal", {"embeddings": [[1, 2], 3]}, False),
    ("causal", {"text": ""}, False),
    ("causal", {"text": []}, False),
    ("causal", {"embeddings": E4, "text": "Hi"}, False),
    ("causal", {"embeddings": E4, "text": None}, True),
    ("causal", {"text": "Hi", "embeddings": None}, True),
    ("causal", {"embeddings": None, "text": None}, False),
    ("causal", {"embeddings": E4, "attention_mask": [[1, 1]]}, False),
    ("causal", {"embeddings": E4, "attention_mask": None}, True),
    ("causal", {"embeddings": BATCH, "attention_mask": [[1, 1], [1, 0]]}, True),
    ("causal", {"embeddings": BATCH, "attention_mask": [[True, True], [True, False]]}, True),
    ("causal", {"embeddings": BATCH, "attention_mask": []}, False),
    ("causal", {"embeddings": BATCH, "attention_mask": [[1, 2], [1, 1]]}, False),
    ("causal", {"text": "Hi", "attention_mask": [[1]]}, False),
    ("causal", {"text": "Hi", "embedding_dim": 4, "context_length": 8}, True),
    ("causal", {"embeddings": E4, "embedding_dim": 4}, False),
    ("causal", {"embeddings": E4, "embedding_dim": None}, True),
    # A finite float32 is admitted; one whose scores overflow float32 (the largest float32, say)
    # is refused by the rule the description states, which JSON Schema cannot.
    ("causal", {"embeddings": [[1e18, 1.0]]}, True),
    ("causal", {"embeddings": [[1e39, 1.0]]}, False),
    ("causal", {"embeddings": [[True, 1.0]]}, False),
    ("causal", {"embeddings": E4, "d_out": 2.0}, True),
    ("causal", {"embeddings": E4, "d_out": 2.5}, False),
    ("causal", {"embeddings": E4, "d_out": 0}, False),
    ("causal", {"embeddings": E4, "d_out": 1025}, False),  # ATTENTION_MAX_DIM
    ("causal", {"embeddings": E4, "seed": 2**64 - 1}, True),
    ("causal", {"embeddings": E4, "seed": 2**64}, False),
    ("causal", {"embeddings": E4, "dropout": 0}, True),
    ("causal", {"embeddings": E4, "dropout": 1}, False),
    ("causal", {"embeddings": E4, "num_heads": 2}, False),
    ("causal", {"embeddings": E4, "include": ["mask", "queries"]}, True),
    ("causal", {"embeddings": E4, "include": ["head_outputs"]}, False),
    ("causal", {"embeddings": E4, "unknown": 1}, False),
    ("simplified", {"embeddings": E4, "seed": None}, False),  # not a field of simplified
    ("multi-head", {"embeddings": E4, "num_heads": 64, "d_out": 64}, True),
    ("multi-head", {"embeddings": E4, "num_heads": 65}, False),  # ATTENTION_MAX_HEADS
    ("multi-head", {"embeddings": E4, "implementation": "wrapper"}, True),
    ("multi-head", {"embeddings": E4, "implementation": "v2"}, False),
    ("self-attention", {"embeddings": E4, "implementation": "v1"}, True),
    ("self-attention", {"embeddings": E4, "implementation": "v1", "qkv_bias": True}, False),
    ("self-attention", {"embeddings": E4, "implementation": "v1", "qkv_bias": None}, True),
    ("grouped-query", {"embeddings": E4, "num_kv_groups": 2}, True),
    ("grouped-query", {"embeddings": E4, "num_kv_groups": 0}, False),
    ("latent", {"embeddings": E4, "latent_dim": 1025}, False),
    ("sliding-window", {"embeddings": E4, "window_size": 2**31}, False),
    (
        "self-attention",
        {
            "embeddings": E4,
            "parameters": {f"W_{n}": WEIGHTS_4x4 for n in QKV},
        },
        True,
    ),
    (
        "self-attention",
        {
            "embeddings": E4,
            "parameters": {f"W_{n}": {"data": WEIGHTS_4x4} for n in QKV},
        },
        True,
    ),
    (
        "self-attention",  # b_query without qkv_bias
        {
            "embeddings": E4,
            "parameters": {
                **{f"W_{n}": WEIGHTS_4x4 for n in QKV},
                "b_query": [0.0] * 4,
            },
        },
        False,
    ),
    (
        "self-attention",  # the biases qkv_bias asks for missing
        {
            "embeddings": E4,
            "qkv_bias": True,
            "parameters": {f"W_{n}": WEIGHTS_4x4 for n in QKV},
        },
        False,
    ),
    (
        "self-attention",  # a boolean is no weight
        {
            "embeddings": E4,
            "parameters": {
                "W_query": [[0.1, True, 0.1, 0.1], *WEIGHTS_4x4[1:]],
                "W_key": WEIGHTS_4x4,
                "W_value": WEIGHTS_4x4,
            },
        },
        False,
    ),
    (
        "multi-head",
        {
            "embeddings": E4,
            "implementation": "wrapper",
            "parameters": {"heads": [{f"W_{n}": WEIGHTS_4x4 for n in QKV}] * 2},
        },
        True,
    ),
    (
        "multi-head",  # the wrapper's weights for the fused class
        {
            "embeddings": E4,
            "parameters": {"heads": [{f"W_{n}": WEIGHTS_4x4 for n in QKV}] * 2},
        },
        False,
    ),
    ("compare", {"embeddings": E4}, True),
    ("compare", {"embeddings": E4, "variants": ["causal", "latent"]}, True),
    ("compare", {"embeddings": E4, "variants": []}, False),
    ("compare", {"embeddings": E4, "variants": ["nope"]}, False),
    ("compare", {"embeddings": E4, "include": ["head_outputs"]}, True),
    ("compare", {"embeddings": E4, "implementation": "v1", "variants": ["self-attention"]}, True),
    ("compare", {"embeddings": E4, "implementation": "v1", "variants": ["causal"]}, False),
    ("compare", {"embeddings": E4, "implementation": "wrapper"}, True),
    ("compare", {"embeddings": E4, "implementation": "v1", "qkv_bias": True}, False),
    ("compare", {"embeddings": E4, "parameters": None}, False),  # no field of compare
]


def request_schema(document: dict[str, Any], variant: str) -> dict[str, Any]:
    operation = document["paths"][f"/attention/{variant}"]["post"]
    return operation["requestBody"]["content"]["application/json"]["schema"]


def admits(document: dict[str, Any], variant: str, body: Any) -> bool:
    validator = jsonschema.Draft202012Validator(request_schema(document, variant))
    return validator.is_valid(body)


@pytest.fixture(scope="module")
async def document(client) -> dict[str, Any]:
    return (await client.get("/openapi.json")).json()


@pytest.mark.parametrize(("variant", "body", "valid"), CASES)
async def test_the_document_and_the_service_agree_with_the_contract(
    client, document, variant, body, valid
):
    response = await client.post(f"/attention/{variant}", json=body)

    assert admits(document, variant, body) is valid
    assert response.status_code == (200 if valid else 422), response.text


def test_every_document_schema_is_valid_json_schema(app):
    document = app.openapi()
    for variant in (*VARIANT_NAMES, "compare"):
        jsonschema.Draft202012Validator.check_schema(request_schema(document, variant))


def keywords(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in keywords(item)}
    if isinstance(value, list):
        return {key for item in value for key in keywords(item)}
    return set()


def test_no_pydantic_constraint_is_left_in_pydantic_spelling(app):
    """`ge`/`le` are pydantic's words, which a JSON Schema validator ignores: a bound written
    so would be no bound at all."""
    assert not keywords(app.openapi()["paths"]) & {"ge", "le", "gt", "lt"}


VARIANT_NAMES = VARIANTS
SMALL = Settings(
    max_tokens=5,
    max_batch_size=3,
    max_dim=8,
    max_heads=2,
    max_context_length=64,
    max_text_chars=40,
)


def branches(document: dict[str, Any], variant: str) -> dict[str, dict[str, Any]]:
    return {branch["title"]: branch for branch in request_schema(document, variant)["oneOf"]}


def test_the_limits_in_the_document_are_the_running_settings():
    document = create_app(SMALL).openapi()

    matrix, batch, text = branches(document, "multi-head").values()
    embeddings = matrix["properties"]["embeddings"]
    assert (embeddings["maxItems"], embeddings["items"]["maxItems"]) == (5, 8)
    assert batch["properties"]["embeddings"]["maxItems"] == 3
    mask = batch["properties"]["attention_mask"]["anyOf"][0]
    assert (mask["maxItems"], mask["items"]["maxItems"]) == (3, 5)
    single, several = text["properties"]["text"]["anyOf"]
    assert single["maxLength"] == 40 and several["maxItems"] == 3
    assert several["items"]["maxLength"] == 40
    for field, limit in (("d_out", 8), ("num_heads", 2), ("context_length", 64)):
        schema = text["properties"][field]
        assert schema.get("anyOf", [schema])[0]["maximum"] == limit, field


def test_a_default_beyond_the_settings_makes_its_field_required():
    """embedding_dim is 256 unless given: above ATTENTION_MAX_DIM=8, leaving it out is a 422,
    so the document requires it; context_length (1024) and latent_dim (max(16, d_out // 8))
    likewise."""
    small, default = create_app(SMALL).openapi(), create_app(Settings()).openapi()

    text = branches(small, "latent")["text"]
    assert sorted(text["required"]) == ["context_length", "embedding_dim", "latent_dim", "text"]
    assert text["properties"]["embedding_dim"]["type"] == "integer"  # not nullable when required
    assert "default" not in text["properties"]["embedding_dim"]
    assert branches(default, "latent")["text"]["required"] == ["text"]


async def test_a_small_deployment_shows_only_the_examples_it_answers():
    app = create_app(SMALL)
    document = app.openapi()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for variant in (*VARIANT_NAMES, "compare"):
            operation = document["paths"][f"/attention/{variant}"]["post"]
            examples = operation["requestBody"]["content"]["application/json"]["examples"]
            for example in examples.values():
                assert admits(document, variant, example["value"]), (variant, example)
                response = await client.post(f"/attention/{variant}", json=example["value"])
                assert response.status_code == 200, (variant, example, response.text)
    # The book's 6 x 3 inputs need 6 tokens: none of their examples fits max_tokens=5.
    assert not any(
        "book" in key
        for variant in VARIANT_NAMES
        for key in document["paths"][f"/attention/{variant}"]["post"]["requestBody"]["content"][
            "application/json"
        ]["examples"]
    )
