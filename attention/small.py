"""The small path: computations too small to pay torch's per-operation cost.

On this project's CPU each torch operation costs ~10 us of dispatch whatever its size, and the
book's 6 x 3 example needs a dozen of them. So below SMALL_WORK_LIMIT multiply-adds (see
`AttentionConfig.multiply_adds`) a computation without dropout runs here, on numpy copies of
the module's weights: the same operations as `attention.variants` and
`attention.functional.attend`, in the same order, in compiled loops (`attention.kernels`) for
the tiniest computations and in numpy above KERNEL_WORK_LIMIT. The results equal torch's up to
float32 rounding (each library sums in its own order); the tests hold every variant to that.
Dropout stays with torch: its masks must come from torch's random stream.
"""

import math
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from attention import kernels
from attention.parameters import Parameters, named_parameters
from attention.variants import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SimplifiedSelfAttention,
)

# Measured on a 2-core CPU (torch 2.13, numpy 2.4, one thread): the book's example takes 15 us
# here against 66 us in torch; numpy is still 2-4x ahead at 32 tokens x 64 dimensions (~0.6M
# multiply-adds) and falls behind for the fused heads at 128 x 64 (~4M). The limit matches the
# default `inline_work_limit`, whose computations run on the event loop, where every microsecond
# is the server's.
SMALL_WORK_LIMIT = 200_000
# Below this the compiled kernels, one call, beat numpy's dozen (the book's example: ~3 us
# against ~10); above it numpy's BLAS products outrun their plain loops (82k multiply-adds: ~31
# us against ~13). Measured as SMALL_WORK_LIMIT was; inside a server the kernels gain more, as
# numpy's many calls run with colder caches.
KERNEL_WORK_LIMIT = 32_768

Steps = dict[str, np.ndarray]


@dataclass(frozen=True)
class NumpyWeights:
    """A module's weights as float32 numpy arrays in the `x @ W` convention.

    The query, key and value matrices sit side by side in one (d_in, 3 x d_out) matrix, so one
    product makes all three: each of their numbers is still the same dot product of an input row
    with one column. The wrapper's heads are stacked on a leading head axis, (H, d_in, 3 x d_out),
    so its heads run as one batched product too.
    """

    kind: str  # "simplified", "single" (v1, v2, causal), "wrapper" or "fused"
    causal: bool
    projections: np.ndarray | None = None  # [W_query | W_key | W_value]
    projection_biases: np.ndarray | None = None  # [b_query | b_key | b_value], (..., 1, 3 x d_out)
    out_proj: np.ndarray | None = None
    out_proj_bias: np.ndarray | None = None
    num_heads: int = 1
    # The same weights laid out for the compiled kernels (see `forward` for which computes).
    kernel: kernels.Layout | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kernel is None:
            kernel = kernels.layout(
                self.kind,
                self.causal,
                self.projections,
                self.projection_biases,
                self.num_heads,
                self.out_proj,
                self.out_proj_bias,
            )
            object.__setattr__(self, "kernel", kernel)  # frozen: set once, here


def numpy_weights(module: nn.Module, parameters: Parameters | None = None) -> NumpyWeights:
    """Copies of `module`'s weights, or of `parameters` (named as `named_parameters` names them)."""
    if isinstance(module, SimplifiedSelfAttention):
        return NumpyWeights("simplified", causal=False)
    named = named_parameters(module) if parameters is None else parameters
    if isinstance(module, MultiHeadAttentionWrapper):
        heads = [side_by_side(head) for head in named["heads"]]
        return NumpyWeights(
            "wrapper",
            causal=True,
            num_heads=len(heads),
            projections=np.stack([matrices for matrices, _ in heads]),
            projection_biases=None if heads[0][1] is None else np.stack([b for _, b in heads]),
        )
    kind = "fused" if isinstance(module, MultiHeadAttention) else "single"
    projections, biases = side_by_side(named)
    return NumpyWeights(
        kind,
        causal=isinstance(module, CausalAttention | MultiHeadAttention),
        num_heads=module.num_heads if kind == "fused" else 1,
        projections=projections,
        projection_biases=biases,
        out_proj=own(named["W_out_proj"]) if kind == "fused" else None,
        out_proj_bias=own(named["b_out_proj"]) if kind == "fused" else None,
    )


def side_by_side(named: Parameters) -> tuple[np.ndarray, np.ndarray | None]:
    """[W_query | W_key | W_value] (d_in, 3 x d_out), and the biases as one (1, 3 x d_out) row."""
    matrices = np.concatenate([own(named[f"W_{name}"]) for name in QKV], axis=1)
    if "b_query" not in named:
        return matrices, None
    return matrices, np.concatenate([own(named[f"b_{name}"]) for name in QKV])[np.newaxis]


QKV = ("query", "key", "value")


def own(tensor) -> np.ndarray:
    """A C-contiguous float32 copy: numpy's products are fastest on it, and the module's
    tensors stay untouched."""
    return np.array(tensor.detach().numpy(), dtype=np.float32, order="C")


def project(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """`nn.Linear` (or v1's `x @ W`): the product, then the bias, as addmm adds it."""
    projected = x @ weight
    if bias is not None:
        projected += bias
    return projected


def attend(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    causal: bool,
    scaled: bool,
    steps: Steps | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`attention.functional.attend`'s explicit path without dropout: (context, weights)."""
    scores = queries @ keys.swapaxes(-2, -1)  # (..., T, T)
    if steps is not None:
        steps["attention_scores"] = scores
        scores = scores.copy()  # the raw scores are a step of their own: mask a copy
    if causal:
        mask = kernels.causal_mask(scores.shape[-1])
        np.copyto(scores, -np.inf, where=mask)
        if steps is not None:
            steps["mask"] = mask
    if scaled:
        scores /= np.float32(math.sqrt(keys.shape[-1]))
        if steps is not None:
            steps["scaled_scores"] = scores.copy()
    # Softmax as torch computes it: shift by the row's maximum, exponentiate, normalise. The
    # ufuncs' own reductions: `.max()` and `.sum()` add a Python wrapper each.
    scores -= np.maximum.reduce(scores, axis=-1, keepdims=True)
    weights = np.exp(scores, out=scores)
    weights /= np.add.reduce(weights, axis=-1, keepdims=True)
    if steps is not None and causal:
        steps["weights_before_dropout"] = weights  # no dropout here: the weights themselves
    return weights @ values, weights


def forward(
    weights: NumpyWeights, x: np.ndarray, *, work: int, steps: Steps | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Context vectors (b, T, output_dim) and attention weights (b, T, T) or (b, H, T, T).

    x: (b, T, d_in) float32; `work`: the computation's multiply-adds, which choose between the
    compiled kernels (`attention.kernels`) and numpy. `steps`, when given, receives the same
    tensors under the same names as the torch modules record them (parameters aside: the runner
    adds those). The steps do not choose the path: asking for them never changes a number of
    the answer.
    """
    if work <= KERNEL_WORK_LIMIT:
        return kernels.forward(weights.kernel, x, steps)
    return forward_numpy(weights, x, steps=steps)


def forward_numpy(
    weights: NumpyWeights, x: np.ndarray, *, steps: Steps | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`forward` in numpy operations: above KERNEL_WORK_LIMIT numpy's BLAS products outrun the
    kernels' plain loops."""
    if weights.kind == "simplified":
        return attend(x, x, x, causal=False, scaled=False, steps=steps)
    if weights.kind == "wrapper":
        x = x[:, np.newaxis]  # (b, 1, T, d_in) against (H, d_in, 3 d_out): every head at once
    projected = project(x, weights.projections, weights.projection_biases)
    width = projected.shape[-1] // 3
    queries, keys, values = (
        projected[..., :width],
        projected[..., width : 2 * width],
        projected[..., 2 * width :],
    )
    if weights.kind == "fused":
        b, num_tokens, d_out = keys.shape
        split = (b, num_tokens, weights.num_heads, d_out // weights.num_heads)
        keys = keys.reshape(split).transpose(0, 2, 1, 3)  # (b, H, T, head_dim)
        queries = queries.reshape(split).transpose(0, 2, 1, 3)
        values = values.reshape(split).transpose(0, 2, 1, 3)
    if steps is not None:
        steps.update(queries=queries, keys=keys, values=values)
    context, attention = attend(
        queries, keys, values, causal=weights.causal, scaled=True, steps=steps
    )
    if weights.kind == "single":
        return context, attention
    if steps is not None:
        steps["head_outputs"] = context  # (b, H, T, head_dim or d_out)
    b, heads, num_tokens, width = context.shape
    context = context.transpose(0, 2, 1, 3).reshape(b, num_tokens, heads * width)
    if weights.kind == "fused":
        context = project(context, weights.out_proj, weights.out_proj_bias)
    return context, attention
