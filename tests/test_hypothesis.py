"""Properties over random shapes, seeds and parameters (hypothesis), through the service's own
parse -> prepare -> compute path: rows sum to 1, the causal triangle is exactly 0, the fused
path equals the plain one, and each batch item equals its request alone."""

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import VARIANTS
from service.engine import Engine
from service.parsing import parse_request
from service.settings import Settings
from tests.contract import CAUSAL

ENGINE = Engine(Settings())


@st.composite
def requests(draw):
    variant = VARIANTS[draw(st.sampled_from(sorted(VARIANTS)))]
    batch, tokens, d_in = draw(
        st.tuples(*(st.integers(1, 4), st.integers(1, 9), st.integers(1, 8)))
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fields: dict = {"embeddings": rng.uniform(-3, 3, (batch, tokens, d_in)).tolist()}
    if "seed" in variant.parameters:
        fields["seed"] = draw(st.integers(0, 2**64 - 1))
        fields["qkv_bias"] = draw(st.booleans())
    if "implementation" in variant.parameters:
        fields["implementation"] = draw(st.sampled_from(variant.implementation_names))
    if "num_heads" in variant.parameters:
        fields["num_heads"] = draw(st.integers(1, 4))
    if "d_out" in variant.parameters:
        # Every multi-head class but the wrapper splits d_out into its heads.
        split = "num_heads" in fields and fields.get("implementation") != "wrapper"
        heads = fields["num_heads"] if split else 1
        fields["d_out"] = heads * draw(st.integers(1, 4))
    if "num_kv_groups" in variant.parameters:
        divisors = [g for g in range(1, fields["num_heads"] + 1) if fields["num_heads"] % g == 0]
        fields["num_kv_groups"] = draw(st.sampled_from(divisors))
    if "window_size" in variant.parameters:
        fields["window_size"] = draw(st.integers(1, 10))
    if "latent_dim" in variant.parameters:
        fields["latent_dim"] = draw(st.none() | st.integers(1, 8))
    if fields.get("implementation") == "v1":
        fields["qkv_bias"] = False
    return variant, {name: value for name, value in fields.items() if value is not None}


def answer(variant, fields):
    job = ENGINE.prepare(variant, parse_request(orjson.dumps(fields), variant))
    return ENGINE.payload(job, threads=1)


@settings(max_examples=150, deadline=None, database=None)
@given(requests())
def test_weights_are_distributions_and_causal_ones_see_no_future(request):
    variant, fields = request
    weights = answer(variant, fields)["attention_weights"]  # (B, [H,] T, T)

    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-5)
    assert (weights >= 0).all()
    if variant.name in CAUSAL:
        tokens = weights.shape[-1]
        future = np.triu(np.ones((tokens, tokens), dtype=bool), k=1)
        assert (weights[..., future] == 0).all()


@settings(max_examples=150, deadline=None, database=None)
@given(requests())
def test_the_fused_path_equals_the_plain_path(request):
    variant, fields = request
    plain = answer(variant, fields)["context_vectors"]
    fused = answer(variant, {**fields, "return_weights": False})["context_vectors"]

    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-5)


@settings(max_examples=100, deadline=None, database=None)
@given(requests())
def test_each_batch_item_equals_its_request_alone(request):
    # Without dropout: the book draws one mask for the whole batch, so items would differ.
    variant, fields = request
    batch = answer(variant, fields)
    for index, item in enumerate(fields["embeddings"]):
        alone = answer(variant, {**fields, "embeddings": item})  # 2-D: no batch axis
        np.testing.assert_allclose(
            alone["context_vectors"], batch["context_vectors"][index], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            alone["attention_weights"], batch["attention_weights"][index], rtol=1e-5, atol=1e-6
        )
