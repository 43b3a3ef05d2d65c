"""The small path: computations too small to pay torch's per-operation cost.

On this project's CPU each torch operation costs ~10 us of dispatch whatever its size, and the
book's 6 x 3 example needs a dozen of them. So below SMALL_WORK_LIMIT multiply-adds (see
`AttentionConfig.multiply_adds`) a computation without dropout runs in one call of a C kernel
(attention/small_kernel.c), on float32 copies of the module's weights kept here: the operations
of `attention.variants` and `attention.functional.attend`, in their order. The results equal
torch's up to float32 rounding (each sums in its own order); the tests hold every variant and
step to that. Dropout stays with torch: its masks must come from torch's random stream.

This second implementation of the arithmetic serves the bench's small-answer and throughput
goals (docs/performance.md): with torch alone, or numpy's dozen calls, the book's request is
slower than a bare echo endpoint.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from attention import _small_kernel
from attention.parameters import Parameters, named_parameters
from attention.variants import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SimplifiedSelfAttention,
)

# Measured on a 2-core CPU (torch 2.13, one thread): the book's example takes ~1 us here against
# ~30 us in torch; at the limit (~0.2M multiply-adds: the wrapper's 4 heads over 32 tokens x 32
# dimensions) 34 us against 186; at ~0.7M (one head over 32 x 64) the two are level, and beyond,
# torch's vectorised products pull ahead. The limit matches the default `inline_work_limit`,
# whose computations run on the event loop, where every microsecond is the server's.
SMALL_WORK_LIMIT = 200_000

Steps = dict[str, np.ndarray]


@dataclass(frozen=True)
class NumpyWeights:
    """A module's weights as float32 numpy arrays in the `x @ W` convention, laid out as the
    kernel reads them.

    The query, key and value matrices sit side by side in one (d_in, 3 x d_out) matrix, so one
    product makes all three: each of their numbers is still the same dot product of an input row
    with one column. The wrapper's heads are stacked on a leading head axis, (H, d_in, 3 x d_out),
    one such matrix per head.
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
    """A C-contiguous float32 copy, as the kernel reads it; the module's tensors stay
    untouched."""
    return np.array(tensor.detach().numpy(), dtype=np.float32, order="C")


@lru_cache(maxsize=64)
def causal_mask(num_tokens: int) -> np.ndarray:
    """(T, T) booleans, True above the diagonal, shared and read-only: the `mask` step."""
    mask = np.triu(np.ones((num_tokens, num_tokens), dtype=bool), k=1)
    mask.flags.writeable = False
    return mask


# Inputs whose squares sum to more than this go to torch (the kernel declines them, with the same
# bound), and so do supplied weights beyond MODERATE_WEIGHTS_SUM_OF_SQUARES (see
# moderate_weights): the service refuses an overflowed answer, and torch's path is the one that
# checks. Within both bounds (|x| <= 1e12 and |W| <= 1e6 in Frobenius norm, which seeded
# weights, each entry below 1 in a computation within SMALL_WORK_LIMIT, stay far below) no score
# exceeds (1e12 * 1e6)^2 = 1e36 and no number overflows: the small path needs no such check.
MODERATE_SUM_OF_SQUARES = _small_kernel.MODERATE_SUM_OF_SQUARES  # 1e24, the kernel's own
MODERATE_WEIGHTS_SUM_OF_SQUARES = 1e12


def moderate(x: np.ndarray | torch.Tensor, bound: float) -> bool:
    """Whether the squares of `x` sum to at most `bound`: one product, in float64, which cannot
    overflow on float32's numbers."""
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


def float32_rows(rows: object) -> np.ndarray | None:
    """(T, d) float32 from a list of T lists of d Python floats (as a JSON decoder gives them),
    each rounded from its double as numpy's cast rounds it; None for anything else. One C call:
    numpy's conversion of nested lists costs more than the book's whole computation."""
    return _small_kernel.float32_rows(rows)


KINDS = {"simplified": 0, "single": 1, "wrapper": 2, "fused": 3}  # the kernel's numbering
# The kernel's steps, in its order; each (b, heads, T, head_dim) or (b, heads, T, T).
KERNEL_STEPS = (
    "queries",
    "keys",
    "values",
    "attention_scores",
    "scaled_scores",
    "head_outputs",
)


def forward(
    weights: NumpyWeights, x: np.ndarray, *, steps: Steps | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Context vectors (b, T, output_dim) and attention weights (b, T, T) or (b, H, T, T), or
    None for inputs too large to be moderate (torch computes those; see MODERATE_SUM_OF_SQUARES).

    x: (b, T, d_in) float32. `steps`, when given, receives the same tensors under the same
    names as the torch modules record them (parameters aside: the runner adds those). Asking
    for steps never changes a number of the answer: the kernel copies them out of the same
    computation.
    """
    kind, heads = weights.kind, weights.num_heads
    multi_head = kind == "wrapper" or kind == "fused"
    computed = _small_kernel.forward(
        x,
        KINDS[kind],
        weights.causal,
        heads,
        1 if kind == "simplified" else weights.projections.shape[-1] // 3,  # simplified: d_in
        0.0 if weights.scale is None else weights.scale,
        weights.projections,
        weights.projection_biases,
        weights.out_proj,
        weights.out_proj_bias,
        steps is not None,
    )
    if computed is None or steps is None:
        return computed
    context, attention, recorded = computed
    record_steps(steps, weights, recorded, attention, multi_head)
    return context, attention


def record_steps(
    steps: Steps,
    weights: NumpyWeights,
    recorded: tuple[np.ndarray, ...],
    attention: np.ndarray,
    multi_head: bool,
) -> None:
    """The kernel's copies under the torch modules' names and shapes: a single head's steps
    without the head axis; the ones a kind does not have left out."""
    named = dict(zip(KERNEL_STEPS, recorded, strict=True))
    if not multi_head:
        named = {name: step[:, 0] for name, step in named.items()}
        del named["head_outputs"]
    if weights.kind == "simplified":
        steps["attention_scores"] = named["attention_scores"]
        return
    if weights.causal:
        steps["mask"] = causal_mask(attention.shape[-1])
        steps["weights_before_dropout"] = attention  # no dropout here: the weights themselves
    steps.update(named)
