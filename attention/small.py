"""The small path: computations too small to pay torch's per-operation cost.

On this project's CPU each torch operation costs ~10 us of dispatch whatever its size, and the
book's 6 x 3 example needs a dozen of them. So below SMALL_WORK_LIMIT multiply-adds (see
`AttentionConfig.multiply_adds`) a computation without dropout runs here, on numpy copies of
the module's weights: the operations of `attention.variants` and `attention.functional.attend`,
in their order, but for two that change only float32 rounding: softmax skips its shift by the
row's maximum while the scores are small enough not to need it, and sums each row with a
product (see `attend`). The results equal torch's up to float32 rounding (each library sums in
its own order); the tests hold every variant to that. Dropout stays with torch: its masks must
come from torch's random stream.

This second implementation of the arithmetic serves the bench's small-answer and throughput
goals (docs/performance.md): without it the book's request is slower than a bare echo.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

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
# Scores within +-30 exponentiate to [9e-14, 1e13]: no overflow, and for up to 10^4 keys every
# weight stays a normal float32 (>= 9e-14 / 1e17), so softmax needs no shift (see `attend`).
SHIFTLESS_BOUND = 30.0

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
    scale: np.float32 | None = None  # sqrt(d_k) the scores are divided by; None: not scaled


def numpy_weights(module: nn.Module, parameters: Parameters | None = None) -> NumpyWeights:
    """Copies of `module`'s weights, or of `parameters` (named as `named_parameters` names them)."""
    if isinstance(module, SimplifiedSelfAttention):
        return NumpyWeights("simplified", causal=False)
    named = named_parameters(module) if parameters is None else parameters
    if isinstance(module, MultiHeadAttentionWrapper):
        heads = [side_by_side(head) for head in named["heads"]]
        projections = np.stack([matrices for matrices, _ in heads])
        return NumpyWeights(
            "wrapper",
            causal=True,
            num_heads=len(heads),
            projections=projections,
            projection_biases=None if heads[0][1] is None else np.stack([b for _, b in heads]),
            scale=key_scale(projections.shape[-1] // 3),
        )
    kind = "fused" if isinstance(module, MultiHeadAttention) else "single"
    projections, biases = side_by_side(named)
    num_heads = module.num_heads if kind == "fused" else 1
    return NumpyWeights(
        kind,
        causal=isinstance(module, CausalAttention | MultiHeadAttention),
        num_heads=num_heads,
        scale=key_scale(projections.shape[-1] // 3 // num_heads),
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


def key_scale(head_dim: int) -> np.float32:
    """sqrt(d_k) as float32, as torch divides a float32 tensor by the Python float."""
    return np.float32(math.sqrt(head_dim))


def own(tensor) -> np.ndarray:
    """A C-contiguous float32 copy: numpy's products are fastest on it, and the module's
    tensors stay untouched."""
    return np.array(tensor.detach().numpy(), dtype=np.float32, order="C")


@lru_cache(maxsize=64)
def ones_column(num_tokens: int) -> np.ndarray:
    """(T, 1) ones, shared and read-only: a product with it sums each row."""
    ones = np.ones((num_tokens, 1), dtype=np.float32)
    ones.flags.writeable = False
    return ones


@lru_cache(maxsize=64)
def causal_mask(num_tokens: int) -> np.ndarray:
    """(T, T) booleans, True above the diagonal, shared and read-only."""
    mask = np.triu(np.ones((num_tokens, num_tokens), dtype=bool), k=1)
    mask.flags.writeable = False
    return mask


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b. Two matrices go through ndarray.dot, which hands them to BLAS directly: a third of
    the per-call cost of matmul, whose general (stacked) machinery a tiny product does not need."""
    if a.ndim == 2 and b.ndim == 2:
        return a.dot(b)
    return a @ b


def project(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """`nn.Linear` (or v1's `x @ W`): the product, then the bias, as addmm adds it."""
    projected = product(x, weight)
    if bias is not None:
        projected += bias
    return projected


def attend(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    causal: bool,
    scale: np.float32 | None,
    steps: Steps | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`attention.functional.attend`'s explicit path without dropout: (context, weights).
    scale: sqrt(d_k), or None for the simplified attention, which does not scale."""
    scores = product(queries, keys.swapaxes(-2, -1))  # (..., T, T)
    if steps is not None:
        steps["attention_scores"] = scores
        scores = scores.copy()  # the raw scores are a step of their own: mask a copy
    if scale is not None:  # before the mask, as the masked entries stay -inf either way
        scores /= scale
    # Softmax: exponentiate, normalise. torch first shifts each row by its maximum, so that
    # exp can neither overflow nor lose a row to underflow. While every score is within
    # +-SHIFTLESS_BOUND neither can happen and the shift changes only float32 rounding, so it is
    # skipped; the bound is checked with one product (the sum of squares), and the rows are
    # summed with another. A row's maximum, the subtraction and a reduction are among numpy's
    # costliest calls on a tiny matrix: inside a server this function and its callers took
    # ~25-28 us a book-sized request with them, ~20-23 without (the compiled kernels this path
    # replaces, ~8-10).
    flat = scores.reshape(-1)
    shift = not flat.dot(flat) <= SHIFTLESS_BOUND**2  # also when it is inf or nan
    if causal:
        mask = causal_mask(scores.shape[-1])
        np.copyto(scores, -np.inf, where=mask)
        if steps is not None:
            steps["mask"] = mask
    if scale is not None and steps is not None:
        steps["scaled_scores"] = scores.copy()
    if shift:
        scores -= np.maximum.reduce(scores, axis=-1, keepdims=True)
    weights = np.exp(scores, out=scores)
    weights /= product(weights, ones_column(weights.shape[-1]))  # each row's sum, (..., T, 1)
    if steps is not None and causal:
        steps["weights_before_dropout"] = weights  # no dropout here: the weights themselves
    return product(weights, values), weights


# Inputs whose squares sum to more than this go to torch, and so do supplied weights beyond
# MODERATE_WEIGHTS_SUM_OF_SQUARES (see moderate_weights): numpy warns when its products overflow
# float32, torch does not, and the service refuses an overflowed answer either way. Within both
# bounds (|x| <= 1e12 and |W| <= 1e6 in Frobenius norm, which seeded weights, each entry below 1
# in a computation within SMALL_WORK_LIMIT, stay far below) no score exceeds
# (1e12 * 1e6)^2 = 1e36 and no number overflows: the small path needs no check for overflow.
MODERATE_SUM_OF_SQUARES = 1e24
MODERATE_WEIGHTS_SUM_OF_SQUARES = 1e12


def moderate(x: np.ndarray | torch.Tensor, bound: float = MODERATE_SUM_OF_SQUARES) -> bool:
    """Whether the small path can take `x` without numpy overflowing: one product, in float64,
    which cannot overflow on float32's numbers (~1 us for the book's example)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    return bool(flat.dot(flat) <= bound)


def moderate_weights(weights: NumpyWeights) -> bool:
    """Whether supplied weights are moderate: the squares of each kind (the query, key and value
    matrices side by side, their biases, the output projection's) sum to at most
    MODERATE_WEIGHTS_SUM_OF_SQUARES, which bounds every matrix among them."""
    arrays = (
        weights.projections,
        weights.projection_biases,
        weights.out_proj,
        weights.out_proj_bias,
    )
    return all(
        moderate(array, MODERATE_WEIGHTS_SUM_OF_SQUARES) for array in arrays if array is not None
    )


def forward(
    weights: NumpyWeights, x: np.ndarray, *, steps: Steps | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Context vectors (b, T, output_dim) and attention weights (b, T, T) or (b, H, T, T).

    x: (b, T, d_in) float32. `steps`, when given, receives the same tensors under the same
    names as the torch modules record them (parameters aside: the runner adds those). Asking
    for steps never changes a number of the answer: the same operations run either way.
    """
    if x.shape[0] != 1:
        return forward_sequences(weights, x, steps)
    # One sequence, the usual request: computed on its (T, d_in) matrix, whose products are
    # cheaper calls (see `product`), with the batch axis put back on the results.
    context, attention = forward_sequences(weights, x[0], steps)
    if steps is not None:
        for name, step in steps.items():
            if name != "mask":  # (T, T) whatever the batch
                steps[name] = step[np.newaxis]
    return context[np.newaxis], attention[np.newaxis]


def forward_sequences(
    weights: NumpyWeights, x: np.ndarray, steps: Steps | None
) -> tuple[np.ndarray, np.ndarray]:
    """`forward` on x (..., T, d_in): a batch (b, T, d_in) or one sequence (T, d_in), whose
    results then have no batch axis either."""
    if weights.kind == "simplified":
        return attend(x, x, x, causal=False, scale=None, steps=steps)
    if weights.kind == "wrapper":
        x = x[..., np.newaxis, :, :]  # (..., 1, T, d_in) against (H, d_in, 3 d_out): all heads
    projected = project(x, weights.projections, weights.projection_biases)
    width = projected.shape[-1] // 3
    queries, keys, values = (
        projected[..., :width],
        projected[..., width : 2 * width],
        projected[..., 2 * width :],
    )
    if weights.kind == "fused":
        split = (*keys.shape[:-1], weights.num_heads, width // weights.num_heads)
        keys = keys.reshape(split).swapaxes(-3, -2)  # (..., H, T, head_dim)
        queries = queries.reshape(split).swapaxes(-3, -2)
        values = values.reshape(split).swapaxes(-3, -2)
    if steps is not None:
        steps.update(queries=queries, keys=keys, values=values)
    context, attention = attend(
        queries, keys, values, causal=weights.causal, scale=weights.scale, steps=steps
    )
    if weights.kind == "single":
        return context, attention
    if steps is not None:
        steps["head_outputs"] = context  # (..., H, T, head_dim or d_out)
    *leading, heads, num_tokens, width = context.shape
    context = context.swapaxes(-3, -2).reshape(*leading, num_tokens, heads * width)
    if weights.kind == "fused":
        context = project(context, weights.out_proj, weights.out_proj_bias)
    return context, attention
