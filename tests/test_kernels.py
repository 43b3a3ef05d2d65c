"""The compiled kernels (attention.kernels): what their answers must be whatever the torch
modules say (test_small holds every number to those), and that asking for steps never changes
a number."""

import numpy as np
import pytest

from attention import VARIANTS, AttentionConfig, AttentionRunner, kernels, small

RTOL = 1e-6  # float32 rounding, summed in another order: see test_small


def weights_of(name: str, implementation: str | None, qkv_bias: bool, num_heads: int):
    variant = VARIANTS[name]
    if name == "simplified":
        cfg = AttentionConfig(d_in=5, d_out=5)
    else:
        cfg = AttentionConfig(
            d_in=5,
            d_out=4,
            num_heads=num_heads if variant.multi_head else 1,
            seed=7,
            qkv_bias=qkv_bias,
            implementation=implementation,
        )
    module, _ = AttentionRunner().module(variant, cfg)
    return small.numpy_weights(module)


CASES = [
    (name, implementation, qkv_bias, heads)
    for name, variant in VARIANTS.items()
    if variant.small_path
    for implementation in variant.implementations
    for qkv_bias in ((False,) if name == "simplified" or implementation == "v1" else (False, True))
    for heads in ((1, 2) if variant.multi_head else (1,))
]


@pytest.mark.parametrize("name,implementation,qkv_bias,heads", CASES)
@pytest.mark.parametrize("shape", [(1, 6, 5), (3, 4, 5), (2, 1, 5)])
def test_steps_or_not_the_answer_is_the_same_to_the_bit(
    name, implementation, qkv_bias, heads, shape
):
    weights = weights_of(name, implementation, qkv_bias, heads)
    x = np.random.default_rng(len(CASES)).standard_normal(shape).astype(np.float32)

    context, attention = kernels.forward(weights.kernel, x)
    steps: dict[str, np.ndarray] = {}
    context_with_steps, attention_with_steps = kernels.forward(weights.kernel, x, steps)

    assert context.tobytes() == context_with_steps.tobytes()
    assert attention.tobytes() == attention_with_steps.tobytes()
    for array in (context, attention):
        assert array.dtype == np.float32
        assert array.flags.c_contiguous  # orjson serialises it without a copy
    batch, num_tokens, _ = shape
    weights_shape = (batch, num_tokens, num_tokens)
    if weights.kind in ("wrapper", "fused"):  # multi-head: a head axis, even for one head
        weights_shape = (batch, weights.num_heads, num_tokens, num_tokens)
    assert attention.shape == weights_shape
    np.testing.assert_allclose(attention.sum(-1), 1, rtol=1e-6)
    if weights.causal:  # nothing attends to the future: exact zeros above the diagonal
        future = np.triu(np.ones((num_tokens, num_tokens), dtype=bool), k=1)
        assert (attention[..., future] == 0).all()
        assert (steps["scaled_scores"][..., future] == -np.inf).all()
        assert steps["mask"].tolist() == future.tolist()
    if "scaled_scores" in steps:  # the raw scores, divided by sqrt(d_k) where not masked
        raw = steps["attention_scores"]
        head_dim = steps["keys"].shape[-1]
        visible = np.isfinite(steps["scaled_scores"])
        np.testing.assert_array_equal(
            steps["scaled_scores"][visible], (raw / np.float32(np.sqrt(head_dim)))[visible]
        )


def test_a_non_contiguous_input_gives_the_same_numbers():
    weights = weights_of("multi-head", "fused", True, 2)
    x = np.random.default_rng(1).standard_normal((2, 5, 10)).astype(np.float32)[:, :, ::2]

    context, attention = kernels.forward(weights.kernel, x)
    want_context, want_attention = kernels.forward(weights.kernel, np.ascontiguousarray(x))

    assert context.tobytes() == want_context.tobytes()
    assert attention.tobytes() == want_attention.tobytes()
