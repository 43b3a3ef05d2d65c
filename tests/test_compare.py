"""`POST /attention/compare`: several variants on one input, each answering as its own endpoint."""

from typing import Any

import pytest

from attention import STEPS, VARIANTS
from service.settings import Settings
from tests.conftest import BOOK, make_client

SHARED = {"d_out": 2, "seed": 123}


async def own_answer(client, name: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/attention/{name}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_every_variant_by_default_each_as_its_own_endpoint_answers(client):
    body = {"embeddings": BOOK["inputs"], **SHARED}

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    assert list(answers) == list(VARIANTS)
    assert answers["simplified"] == await own_answer(
        client, "simplified", {"embeddings": BOOK["inputs"]}
    ), "d_out and seed are not passed to the variant without weights"
    for name in ("self-attention", "causal", "multi-head"):
        assert answers[name] == await own_answer(client, name, body), name


async def test_the_book_example_reproduces_the_books_numbers(client, openapi):
    operation = openapi["paths"]["/attention/compare"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    assert examples["book"]["value"]["embeddings"] == BOOK["inputs"]

    for example in examples.values():
        response = await client.post("/attention/compare", json=example["value"])
        assert response.status_code == 200, response.text

    answers = (await client.post("/attention/compare", json=examples["book"]["value"])).json()
    answers = answers["answers"]
    # Section 3.3's second query: "journey" attends mostly to itself (0.2379).
    assert answers["simplified"]["attention_weights"][1][1] == 0.2379
    assert answers["causal"]["attention_weights"][1][:2] == [0.4833, 0.5167]  # section 3.5


@pytest.fixture(scope="module")
async def openapi(client) -> dict[str, Any]:
    return (await client.get("/openapi.json")).json()


async def test_variants_chooses_and_orders_them(client):
    body = {"embeddings": BOOK["inputs"], "variants": ["causal", "simplified", "causal"]}

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 200, response.text
    assert list(response.json()["answers"]) == ["causal", "simplified"]


async def test_a_bad_variant_name_is_a_422_listing_the_valid_ones(client):
    body = {"embeddings": BOOK["inputs"], "variants": ["causal", "multihead"]}

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "variants", 1]
    assert "multihead" in error["msg"]
    for name in VARIANTS:
        assert name in error["msg"]


async def test_parameters_go_only_to_the_variants_they_apply_to(client):
    body = {
        "embeddings": BOOK["inputs"],
        "d_out": 4,
        "num_heads": 4,
        "dropout": 0.5,
        "implementation": "wrapper",
    }

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 200, response.text
    configs = {name: answer["config"] for name, answer in response.json()["answers"].items()}
    assert configs["simplified"]["d_out"] == 3  # d_in: no d_out of its own
    assert configs["self-attention"]["implementation"] == "v2"  # not the wrapper's
    assert configs["self-attention"]["dropout"] == 0.0
    assert configs["causal"]["dropout"] == 0.5
    assert configs["causal"]["num_heads"] == 1
    assert configs["multi-head"]["num_heads"] == 4
    assert configs["multi-head"]["implementation"] == "wrapper"


async def test_include_gives_each_variant_the_steps_it_has(client):
    body = {"embeddings": BOOK["inputs"], **SHARED, "include": ["mask", "attention_scores"]}

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    assert list(answers["simplified"]["steps"]) == ["attention_scores"]
    assert list(answers["self-attention"]["steps"]) == ["attention_scores"]
    assert list(answers["causal"]["steps"]) == ["mask", "attention_scores"]  # as asked


async def test_an_unknown_step_is_a_422(client):
    body = {"embeddings": BOOK["inputs"], "include": ["attn"]}

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "include", 0]
    assert all(name in error["msg"] for name in STEPS)


async def test_text_input_runs_through_every_variant(client):
    body = {"text": "Your journey starts with one step", "embedding_dim": 8, "variants": None}

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 200, response.text
    for answer in response.json()["answers"].values():
        assert [token["text"] for token in answer["tokens"]][:2] == ["Your", " journey"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"embeddings": BOOK["inputs"], "parameters": {}}, ["body", "parameters"]),
        ({"embeddings": BOOK["inputs"], "heads": 2}, ["body", "heads"]),
        ({"embeddings": BOOK["inputs"], "variants": []}, ["body", "variants"]),
        ({"embeddings": BOOK["inputs"], "variants": "causal"}, ["body", "variants"]),
        ({"embeddings": BOOK["inputs"], "implementation": "v3"}, ["body", "implementation"]),
        (
            {"embeddings": BOOK["inputs"], "implementation": "v1", "variants": ["causal"]},
            ["body", "implementation"],
        ),
        ({"embeddings": BOOK["inputs"], "num_heads": 0}, ["body", "num_heads"]),
        ({}, ["body"]),
    ],
)
async def test_bad_input_is_a_422(client, body, loc):
    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc


async def test_a_variant_that_cannot_run_is_a_422(client):
    body = {"embeddings": BOOK["inputs"]}  # fused multi-head: d_out 3 over 2 heads

    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 422
    assert "num_heads" in response.json()["detail"][0]["msg"]


async def test_the_answer_limit_counts_every_variant_together():
    """Each variant's answer fits 100 numbers (at most 84 here), all seven do not: 54 for
    simplified (6 x 6 + 6 x 3), 48 for each single head (36 + 12), 84 for each of the four
    multi-head variants (72 + 12), 486 in all."""
    async with make_client(Settings(max_answer_floats=100)) as client:
        body = {"embeddings": BOOK["inputs"], "d_out": 2}
        alone = await client.post("/attention/multi-head", json=body)
        response = await client.post("/attention/compare", json=body)

    assert alone.status_code == 200, alone.text
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["msg"].startswith("numbers in the answer (all variants together) = 486 exceeds")
    assert "ATTENTION_MAX_ANSWER_FLOATS" in error["msg"]


async def test_the_text_is_tokenized_once_for_all_variants(client, monkeypatch):
    import service.engine

    calls = []
    real_tokenize = service.engine.tokenize

    def counting_tokenize(text):
        calls.append(text)
        return real_tokenize(text)

    monkeypatch.setattr(service.engine, "tokenize", counting_tokenize)
    response = await client.post(
        "/attention/compare", json={"text": ["Your journey", "starts"], "embedding_dim": 4}
    )

    assert response.status_code == 200, response.text
    assert calls == ["Your journey", "starts"], "one tokenization per text, not per variant"
    answers = response.json()["answers"]
    assert len(answers) == len(VARIANTS)
    tokens = [answer["tokens"] for answer in answers.values()]
    assert all(each == tokens[0] for each in tokens)
    assert "".join(token["text"] for token in tokens[0][1]) == "starts"
