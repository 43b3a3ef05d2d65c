"""`parameters`: the caller's weights instead of the seeded ones, in the names and `x @ W`
convention `include: ["parameters"]` returns, so an answer's parameters reproduce it exactly."""

from typing import Any

import pytest
import torch

from attention import VARIANTS
from tests.conftest import BOOK

WEIGHTED = [
    (name, implementation)
    for name, variant in VARIANTS.items()
    if "parameters" in variant.parameters
    for implementation in variant.implementations
]


def body_for(name: str, implementation: str | None, batched: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "embeddings": [BOOK["inputs"], BOOK["inputs"][::-1]] if batched else BOOK["inputs"],
        "d_out": 4,
        "seed": 2**40,
    }
    if implementation is not None:
        body["implementation"] = implementation
    if implementation != "v1":
        body["qkv_bias"] = True
    if name in ("causal", "multi-head"):
        body["dropout"] = 0.4  # the masks still come from the seed's stream
    return body


@pytest.mark.parametrize("batched", [False, True], ids=["2-D", "3-D"])
@pytest.mark.parametrize(("name", "implementation"), WEIGHTED)
async def test_returned_parameters_sent_back_reproduce_the_answer_bit_for_bit(
    client, name, implementation, batched
):
    body = body_for(name, implementation, batched)
    first = await client.post(f"/attention/{name}", json={**body, "include": ["parameters"]})
    assert first.status_code == 200, first.text
    answer = first.json()
    parameters = answer["steps"]["parameters"]

    # Elsewhere's seed: only the supplied weights can reproduce the answer (dropout aside).
    again = await client.post(f"/attention/{name}", json={**body, "parameters": parameters})

    assert again.status_code == 200, again.text
    assert again.json()["context_vectors"] == answer["context_vectors"]
    assert again.json()["attention_weights"] == answer["attention_weights"]


async def test_plain_matrices_work_as_well_as_shape_and_data_objects(client):
    body = body_for("causal", None, batched=False)
    answer = (
        await client.post("/attention/causal", json={**body, "include": ["parameters"]})
    ).json()
    plain = {name: value["data"] for name, value in answer["steps"]["parameters"].items()}

    again = await client.post("/attention/causal", json={**body, "parameters": plain})

    assert again.status_code == 200, again.text
    assert again.json()["context_vectors"] == answer["context_vectors"]


async def test_supplied_weights_are_used_in_the_x_at_w_convention(client):
    """softmax((x W_q)(x W_k)^T / sqrt(d_out)) (x W_v), written out with the supplied matrices."""
    generator = torch.Generator().manual_seed(5)
    weights = {name: torch.rand(3, 2, generator=generator) for name in ("query", "key", "value")}
    body = {
        "embeddings": BOOK["inputs"],
        "d_out": 2,
        "parameters": {f"W_{name}": w.tolist() for name, w in weights.items()},
    }

    response = await client.post("/attention/self-attention", json=body)

    assert response.status_code == 200, response.text
    x = torch.tensor(BOOK["inputs"])
    queries, keys, values = (x @ weights[name] for name in ("query", "key", "value"))
    expected = torch.softmax(queries @ keys.T / 2**0.5, dim=-1) @ values
    assert torch.allclose(torch.tensor(response.json()["context_vectors"]), expected, atol=1e-6)


async def test_seed_changes_nothing_without_dropout_when_weights_are_supplied(client):
    body = {"embeddings": BOOK["inputs"], "d_out": 2, "include": ["parameters"]}
    answer = (await client.post("/attention/self-attention", json=body)).json()
    parameters = answer["steps"]["parameters"]

    other = await client.post(
        "/attention/self-attention",
        json={"embeddings": BOOK["inputs"], "d_out": 2, "seed": 9, "parameters": parameters},
    )

    assert other.json()["context_vectors"] == answer["context_vectors"]


async def wrong(client, name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = await client.post(f"/attention/{name}", json={"embeddings": BOOK["inputs"], **body})
    assert response.status_code == 422, response.text
    return response.json()["detail"]


async def test_a_wrong_shape_is_a_422_naming_the_expected_shape(client):
    parameters = {"W_query": [[1.0, 2.0]] * 3, "W_key": [[1.0, 2.0]] * 3, "W_value": [[1.0]] * 3}

    [error] = await wrong(client, "self-attention", {"d_out": 2, "parameters": parameters})

    assert error["loc"] == ["body", "parameters", "W_value"]
    assert "[3, 2]" in error["msg"] and "[3, 1]" in error["msg"]


async def test_missing_and_unexpected_names_are_a_422_listing_the_expected_ones(client):
    parameters = {"W_query": [[1.0]] * 3, "W_keys": [[1.0]] * 3}

    errors = await wrong(client, "causal", {"d_out": 1, "parameters": parameters})

    locs = [error["loc"][-1] for error in errors]
    assert locs == ["W_key", "W_value", "W_keys"]
    assert all("W_query [3, 1], W_key [3, 1], W_value [3, 1]" in e["msg"] for e in errors)


async def test_biases_are_expected_only_with_qkv_bias(client):
    parameters = {f"W_{n}": [[1.0]] * 3 for n in ("query", "key", "value")}

    errors = await wrong(
        client, "self-attention", {"d_out": 1, "qkv_bias": True, "parameters": parameters}
    )

    assert [error["loc"][-1] for error in errors] == ["b_query", "b_key", "b_value"]


async def test_the_wrapper_takes_its_parameters_per_head(client):
    head = {f"W_{n}": [[1.0]] * 3 for n in ("query", "key", "value")}
    body = {"d_out": 1, "num_heads": 2, "implementation": "wrapper"}

    errors = await wrong(client, "multi-head", {**body, "parameters": head})
    assert errors[0]["loc"] == ["body", "parameters", "heads"]
    assert errors[0]["type"] == "missing"
    [error] = await wrong(client, "multi-head", {**body, "parameters": {"heads": [head]}})
    assert error["loc"] == ["body", "parameters", "heads"]
    assert "2 heads" in error["msg"]
    ok = await client.post(
        "/attention/multi-head",
        json={"embeddings": BOOK["inputs"], **body, "parameters": {"heads": [head, head]}},
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "value",
    [
        "x",
        [["a"]] * 3,
        [[True]] * 3,
        [[1.0], [True], [2.0]],  # numpy would read it as 1.0
        {"data": [[1.0], [False], [2.0]]},
        [[1.0], [2.0, 3.0], [4.0]],
        [[1e39]] * 3,
        None,
        {"x": 1},
    ],
)
async def test_a_matrix_that_is_not_finite_numbers_is_a_422(client, value):
    parameters = {"W_query": value, "W_key": [[1.0]] * 3, "W_value": [[1.0]] * 3}

    [error] = await wrong(client, "self-attention", {"d_out": 1, "parameters": parameters})

    assert error["loc"] == ["body", "parameters", "W_query"]


async def test_simplified_has_no_parameters(client):
    [error] = await wrong(client, "simplified", {"parameters": {}})

    assert error["type"] == "extra_forbidden"


@pytest.mark.parametrize("source", ["embeddings", "text"])
async def test_weights_so_large_the_computation_overflows_are_a_422(client, source):
    """Book-sized inputs take the small path, where seeded weights cannot overflow; supplied
    ones as large as float32 allows can, and are refused like inputs that overflow."""
    huge = [[1e30, 1e30]] * 3
    body = {
        "d_out": 2,
        "parameters": {"W_query": huge, "W_key": huge, "W_value": huge},
        **(
            {"embeddings": BOOK["inputs"]}
            if source == "embeddings"
            else {"text": "Your journey", "embedding_dim": 3}
        ),
    }

    response = await client.post("/attention/self-attention", json=body)

    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", source]
    assert error["msg"].startswith("the computation overflowed float32")
