"""The bonus material's variants at the edges of their own parameters, where each becomes (or
stays apart from) chapter 3's multi-head attention, and what every variant's KV cache holds.

The numbers themselves are held to our reference in tests/test_reference.py and
tests/test_steps.py; here each variant is held to another variant run with the same matrices.
"""

from typing import Any

import numpy as np
import pytest
import torch

from service.settings import Settings
from tests.conftest import BOOK, make_client


def inputs(shape: tuple[int, ...], seed: int = 0) -> list[Any]:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).tolist()


async def post(client, variant: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/attention/{variant}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def close(actual: Any, expected: Any, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=atol)


# --- grouped-query -----------------------------------------------------------------------------


async def test_as_many_groups_as_heads_is_multi_head_attention_with_the_same_matrices(client):
    x = inputs((2, 6, 5), 1)
    common = {"embeddings": x, "d_out": 8, "num_heads": 4, "qkv_bias": True}
    grouped = await post(
        client, "grouped-query", {**common, "num_kv_groups": 4, "include": ["parameters"]}
    )
    weights = {name: value["data"] for name, value in grouped["steps"]["parameters"].items()}
    assert "b_out_proj" not in weights, "GroupedQueryAttention's out_proj has no bias"
    weights["b_out_proj"] = [0.0] * 8

    multi_head = await post(client, "multi-head", {**common, "parameters": weights})

    close(grouped["attention_weights"], multi_head["attention_weights"])
    close(grouped["context_vectors"], multi_head["context_vectors"])


async def test_one_group_shares_its_keys_and_values_with_every_head(client):
    body = {
        "embeddings": inputs((5, 6), 2),
        "d_out": 6,
        "num_heads": 3,
        "num_kv_groups": 1,
        "include": ["group_keys", "group_values", "keys", "values", "queries"],
    }
    steps = (await post(client, "grouped-query", body))["steps"]

    assert steps["group_keys"]["shape"] == [1, 5, 2]  # (G, T, head_dim)
    assert steps["keys"]["shape"] == [3, 5, 2]  # (H, T, head_dim)
    for name in ("keys", "values"):
        per_head = np.asarray(steps[name]["data"])
        for head in per_head:
            np.testing.assert_array_equal(head, steps[f"group_{name}"]["data"][0])
    queries = np.asarray(steps["queries"]["data"])
    assert not np.allclose(queries[0], queries[1]), "each head keeps its own queries"


async def test_groups_serve_consecutive_heads(client):
    body = {
        "embeddings": inputs((4, 8), 3),
        "d_out": 8,
        "num_heads": 4,
        "num_kv_groups": 2,
        "include": ["group_keys", "keys"],
    }
    steps = (await post(client, "grouped-query", body))["steps"]
    group_keys, keys = np.asarray(steps["group_keys"]["data"]), np.asarray(steps["keys"]["data"])
    for head, group in enumerate([0, 0, 1, 1]):  # [K1, K1, K2, K2], not [K1, K2, K1, K2]
        np.testing.assert_array_equal(keys[head], group_keys[group])


# --- sliding-window ----------------------------------------------------------------------------


@pytest.mark.parametrize("window_size", [6, 7, 1000])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
async def test_a_window_as_long_as_the_input_is_causal_multi_head_attention(
    client, window_size, dropout
):
    """The same draws (chapter 3's MultiHeadAttention's), the same mask: the same numbers, to
    the bit where both run in torch (with dropout; without, multi-head's tiny computations run
    on the small path, whose sums may round in another order)."""
    body = {"embeddings": inputs((2, 6, 4), 4), "d_out": 4, "seed": 9, "dropout": dropout}
    windowed = await client.post(
        "/attention/sliding-window", json={**body, "window_size": window_size}
    )
    causal = await client.post("/attention/multi-head", json=body)

    assert windowed.status_code == causal.status_code == 200
    for key in ("attention_weights", "context_vectors"):
        if dropout:
            assert windowed.json()[key] == causal.json()[key], key
        else:
            close(windowed.json()[key], causal.json()[key])


async def test_a_window_of_one_attends_to_each_token_alone(client):
    body = {"embeddings": BOOK["inputs"], "d_out": 4, "window_size": 1}
    answer = await post(
        client, "sliding-window", {**body, "include": ["values", "parameters", "mask"]}
    )

    weights = np.asarray(answer["attention_weights"])  # (H, T, T)
    np.testing.assert_array_equal(weights, np.broadcast_to(np.eye(6), (2, 6, 6)))
    mask = np.asarray(answer["steps"]["mask"]["data"])
    np.testing.assert_array_equal(mask, ~np.eye(6, dtype=bool))
    # Each token's context is its own value vector, through out_proj.
    values = np.asarray(answer["steps"]["values"]["data"])  # (H, T, head_dim)
    merged = values.transpose(1, 0, 2).reshape(6, 4)
    parameters = answer["steps"]["parameters"]
    expected = merged @ np.asarray(parameters["W_out_proj"]["data"]) + np.asarray(
        parameters["b_out_proj"]["data"]
    )
    close(answer["context_vectors"], expected, atol=1e-5)


async def test_the_mask_step_is_the_band(client):
    body = {"embeddings": inputs((6, 3), 5), "window_size": 3, "include": ["mask"], "d_out": 2}
    mask = np.asarray((await post(client, "sliding-window", body))["steps"]["mask"]["data"])
    i, j = np.indices((6, 6))
    np.testing.assert_array_equal(mask, (j > i) | (i - j >= 3))


# --- latent ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_out", "latent_dim"), [(8, 16), (128, 16), (256, 32), (264, 33)])
async def test_the_default_latent_is_max_16_or_an_eighth_of_d_out(client, d_out, latent_dim):
    body = {"embeddings": inputs((3, 5), 6), "d_out": d_out, "include": ["latent", "parameters"]}
    answer = await post(client, "latent", body)

    assert answer["config"]["latent_dim"] == latent_dim
    assert answer["steps"]["latent"]["shape"] == [3, latent_dim]
    parameters = answer["steps"]["parameters"]
    assert list(parameters) == ["W_query", "W_DKV", "W_UK", "W_UV", "W_out_proj", "b_out_proj"]
    assert parameters["W_DKV"]["shape"] == [5, latent_dim]
    assert parameters["W_UK"]["shape"] == parameters["W_UV"]["shape"] == [latent_dim, d_out]


async def test_keys_and_values_are_made_from_the_latent(client):
    body = {
        "embeddings": inputs((4, 5), 7),
        "d_out": 6,
        "num_heads": 3,
        "latent_dim": 2,
        "qkv_bias": True,
        "include": ["latent", "keys", "values", "parameters"],
    }
    steps = (await post(client, "latent", body))["steps"]
    latent = np.asarray(steps["latent"]["data"])  # (T, 2)
    p = {name: np.asarray(value["data"]) for name, value in steps["parameters"].items()}
    for name, stem in (("keys", "UK"), ("values", "UV")):
        made = latent @ p[f"W_{stem}"] + p[f"b_{stem}"]  # (T, d_out)
        per_head = made.reshape(4, 3, 2).transpose(1, 0, 2)  # (H, T, head_dim)
        close(steps[name]["data"], per_head, atol=1e-6)


# --- the KV cache --------------------------------------------------------------------------------

# variant -> (body, values per token, tokens kept per sequence), by the formulas of the docs.
KV_CASES = {
    "self-attention": ({"d_out": 5}, 2 * 5, 6),
    "self-attention:v1": ({"d_out": 5, "implementation": "v1"}, 2 * 5, 6),
    "causal": ({"d_out": 5}, 2 * 5, 6),
    "multi-head": ({"d_out": 8, "num_heads": 4}, 2 * 8, 6),
    "multi-head:wrapper": ({"d_out": 3, "num_heads": 4, "implementation": "wrapper"}, 2 * 12, 6),
    "grouped-query": ({"d_out": 8, "num_heads": 4, "num_kv_groups": 2}, 2 * 2 * 2, 6),
    "grouped-query:mqa": ({"d_out": 8, "num_heads": 4}, 2 * 1 * 2, 6),
    "sliding-window": ({"d_out": 8, "window_size": 4}, 2 * 8, 4),
    "sliding-window:long": ({"d_out": 8, "window_size": 10}, 2 * 8, 6),
    "latent": ({"d_out": 8, "latent_dim": 3}, 3, 6),
    "latent:default": ({"d_out": 8}, 16, 6),
}


@pytest.mark.parametrize("case", list(KV_CASES))
@pytest.mark.parametrize("batch", [None, 3])
async def test_every_answer_says_what_a_kv_cache_would_hold(client, case, batch):
    params, values_per_token, tokens = KV_CASES[case]
    x = inputs((6, 4), 8)
    body = {"embeddings": x if batch is None else [x] * batch, **params}
    answer = await post(client, case.split(":")[0], body)

    sequences = batch or 1
    assert answer["kv_cache"] == {
        "values_per_token": values_per_token,
        "tokens": sequences * tokens,
        "values": values_per_token * sequences * tokens,
    }


async def test_simplified_attention_has_no_kv_cache(client):
    answer = await post(client, "simplified", {"embeddings": BOOK["inputs"]})
    assert "kv_cache" not in answer


async def test_compare_shows_the_kv_caches_side_by_side(client):
    body = {"embeddings": BOOK["inputs"], "d_out": 8, "num_heads": 4, "num_kv_groups": 2}
    response = await client.post("/attention/compare", json=body)

    assert response.status_code == 200, response.text
    caches = {
        name: answer.get("kv_cache", {}).get("values_per_token")
        for name, answer in response.json()["answers"].items()
    }
    assert caches == {
        "simplified": None,
        "self-attention": 16,
        "causal": 16,
        "multi-head": 16,
        "grouped-query": 8,
        "sliding-window": 16,
        "latent": 16,
    }


# --- bad parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "params", "field", "words"),
    [
        ("grouped-query", {"num_heads": 4, "num_kv_groups": 3}, "num_kv_groups", ["divide"]),
        ("grouped-query", {"num_heads": 2, "num_kv_groups": 4}, "num_kv_groups", ["divide"]),
        ("grouped-query", {"num_kv_groups": 0}, "num_kv_groups", ["greater than or equal to 1"]),
        ("sliding-window", {"window_size": 0}, "window_size", ["greater than or equal to 1"]),
        ("sliding-window", {"window_size": -3}, "window_size", ["greater than or equal to 1"]),
        ("sliding-window", {"window_size": 2**31}, "window_size", ["less than or equal to"]),
        ("latent", {"latent_dim": 0}, "latent_dim", ["greater than or equal to 1"]),
        ("latent", {"latent_dim": 2000}, "latent_dim", ["ATTENTION_MAX_DIM"]),
        ("sliding-window", {"d_out": 5}, "d_out", ["not divisible by num_heads=2"]),
        ("latent", {"d_out": 5}, "d_out", ["not divisible by num_heads=2"]),
    ],
)
async def test_a_bad_parameter_is_a_422_naming_it(client, variant, params, field, words):
    body = {"embeddings": BOOK["inputs"], "d_out": 4, "num_heads": 2, **params}
    response = await client.post(f"/attention/{variant}", json=body)

    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    for word in words:
        assert word in error["msg"], error["msg"]


@pytest.mark.parametrize(
    ("variant", "field"),
    [("causal", "num_kv_groups"), ("multi-head", "window_size"), ("grouped-query", "latent_dim")],
)
async def test_another_variants_parameter_is_refused(client, variant, field):
    body = {"embeddings": BOOK["inputs"], "d_out": 2, field: 2}
    response = await client.post(f"/attention/{variant}", json=body)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert f"does not apply to variant {variant!r}" in error["msg"]


async def test_latent_dim_obeys_the_dimension_limit_as_d_out_does():
    async with make_client(Settings(max_dim=8)) as client:
        response = await client.post(
            "/attention/latent",
            json={"embeddings": BOOK["inputs"], "d_out": 8, "latent_dim": 9},
        )
        default = await client.post(
            "/attention/latent", json={"embeddings": BOOK["inputs"], "d_out": 8}
        )

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "latent_dim"]
    assert error["msg"] == "latent_dim = 9 exceeds the limit of 8 (ATTENTION_MAX_DIM)"
    # The default latent (16 for d_out 8) is over that limit too, and named the same way.
    assert default.status_code == 422
    assert default.json()["detail"][0]["loc"] == ["body", "latent_dim"]


@pytest.mark.parametrize(
    ("variant", "step", "params"),
    [
        ("grouped-query", "group_keys", {"num_kv_groups": 1}),
        ("grouped-query", "group_values", {"num_kv_groups": 2}),
        ("latent", "latent", {"latent_dim": 3}),
    ],
)
async def test_the_bonus_steps_of_padded_positions_are_null(client, variant, step, params):
    body = {
        "embeddings": inputs((2, 3, 4), 9),
        "attention_mask": [[1, 1, 1], [1, 1, 0]],
        "d_out": 4,
        "include": [step],
        **params,
    }
    data = np.array((await post(client, variant, body))["steps"][step]["data"], dtype=float)
    padded = data[1, ..., 2, :]  # the second item's third token, every group
    assert np.isnan(padded).all()
    assert not np.isnan(data[0]).any() and not np.isnan(data[1, ..., :2, :]).any()
