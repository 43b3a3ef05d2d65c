"""The small path's arithmetic as compiled loops: one call per computation (numba).

For the book's 6 x 3 example `attention.small` makes a dozen numpy calls. Each costs ~1 us in a
tight loop, but 3-4 us inside a server, whose network stack leaves numpy's dispatch code cold in
the caches between requests: measured under load, the numpy computation was a third of a small
request's CPU time. These loops, compiled once by numba, do the same arithmetic in one call.

Same operations in the same order as `attention.small`'s numpy version (and the book's
modules): the projections with their biases added after the product, the raw scores, the causal
mask as -inf, the division by sqrt(d_k), softmax as torch computes it (shift by the row's
maximum, exponentiate, normalise), the weighted sum of the values, then `out_proj` for the fused
class. Every sum runs in index order, where BLAS sums in its own: the results equal torch's up to
float32 rounding, as the tests hold every variant to. The steps (`include`) are recorded by the
same call, so asking for them changes no number. Plain loops are no match for BLAS on larger
inputs: `attention.small` sends those to numpy (KERNEL_WORK_LIMIT).

Every head of every kind is one block of columns of one projection: the wrapper's heads side by
side, the fused class's heads as slices of its queries, keys and values.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

EMPTY = np.zeros(0, dtype=np.float32)  # "no bias"


@dataclass(frozen=True)
class Layout:
    """A module's weights as the kernels read them."""

    projections: np.ndarray | None  # (d_in, n) float32; None: the inputs are q, k and v
    biases: np.ndarray  # (n,), or EMPTY
    # Per head, the first column of its queries, keys and values in the projected row.
    query_columns: np.ndarray  # (H,) int64
    key_columns: np.ndarray
    value_columns: np.ndarray
    width: int  # each head's columns: head_dim
    causal: bool
    scale: np.float32  # sqrt(d_k), or 0 for the simplified attention, which does not scale
    out_proj: np.ndarray | None  # (d_out, d_out) for the fused class
    out_proj_bias: np.ndarray  # (d_out,), or EMPTY
    single: bool  # one head whose weights come back as (b, T, T)


def layout(
    kind: str,
    causal: bool,
    projections: np.ndarray | None,
    biases: np.ndarray | None,
    num_heads: int,
    out_proj: np.ndarray | None,
    out_proj_bias: np.ndarray | None,
) -> Layout:
    """From `attention.small.NumpyWeights`'s fields. projections: (d_in, 3 d_out), or for the
    wrapper (H, d_in, 3 d_out); biases shaped alike with a 1 before the last axis."""
    heads = np.arange(num_heads, dtype=np.int64)
    if kind == "simplified":
        zero = np.zeros(1, dtype=np.int64)
        return Layout(None, EMPTY, zero, zero, zero, 0, False, np.float32(0), None, EMPTY, True)
    if kind == "wrapper":  # head h's [W_query | W_key | W_value] at columns h * 3 d_out on
        width = projections.shape[-1] // 3
        flat = np.concatenate(list(projections), axis=1)  # (d_in, H x 3 d_out)
        flat_biases = EMPTY if biases is None else np.concatenate(list(biases[:, 0]))
        first = heads * 3 * width
        query_columns, key_columns, value_columns = first, first + width, first + 2 * width
    else:  # one [W_query | W_key | W_value]; the fused class's heads are slices of each
        d_out = projections.shape[-1] // 3
        width = d_out // num_heads
        flat = projections
        flat_biases = EMPTY if biases is None else biases[0]
        query_columns = heads * width
        key_columns, value_columns = query_columns + d_out, query_columns + 2 * d_out
    return Layout(
        flat,
        flat_biases,
        query_columns,
        key_columns,
        value_columns,
        width,
        causal,
        np.float32(math.sqrt(width)),
        out_proj,
        EMPTY if out_proj_bias is None else out_proj_bias,
        kind == "single",
    )


Steps = dict[str, np.ndarray]


def forward(
    weights: Layout, x: np.ndarray, steps: Steps | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Context vectors (b, T, output_dim) and attention weights (b, T, T) or (b, H, T, T);
    x: (b, T, d_in) float32. `steps`, when given, receives the intermediate tensors under the
    names and in the shapes the torch modules record them (views of what the kernels wrote:
    the same numbers whether or not they are asked for)."""
    batch, num_tokens, d_in = x.shape
    if weights.projections is None:  # simplified: the inputs are queries, keys and values
        projected, width = x, d_in
    else:
        projected = np.empty((batch, num_tokens, weights.projections.shape[1]), np.float32)
        project(x, weights.projections, weights.biases, projected)
        width = weights.width
    num_heads = len(weights.query_columns)
    attention = np.empty((batch, num_heads, num_tokens, num_tokens), np.float32)
    context = np.empty((batch, num_tokens, num_heads * width), np.float32)
    if steps is None:
        raw_scores = scaled_scores = NO_SCORES
    else:
        raw_scores = np.empty_like(attention)
        scaled_scores = np.empty_like(attention)
    attend(
        projected,
        weights.query_columns,
        weights.key_columns,
        weights.value_columns,
        width,
        weights.causal,
        weights.scale,
        attention,
        context,
        steps is not None,
        raw_scores,
        scaled_scores,
    )
    heads_context = context
    if weights.out_proj is not None:
        output = np.empty((batch, num_tokens, weights.out_proj.shape[1]), np.float32)
        project(context, weights.out_proj, weights.out_proj_bias, output)
        context = output
    if steps is not None:
        record_steps(steps, weights, projected, raw_scores, scaled_scores, attention, heads_context)
    if weights.single:
        return context, attention[:, 0]
    return context, attention


NO_SCORES = np.zeros((0, 0, 0, 0), dtype=np.float32)  # scores not recorded


def record_steps(
    steps: Steps,
    weights: Layout,
    projected: np.ndarray,
    raw_scores: np.ndarray,
    scaled_scores: np.ndarray,
    attention: np.ndarray,
    heads_context: np.ndarray,
) -> None:
    """The steps as the torch modules name and shape them: one head's without a head axis,
    several heads' on axis 1, (b, H, T, ...)."""
    single = weights.single
    if weights.projections is not None:
        batch, num_tokens, columns = projected.shape
        num_heads, width = len(weights.query_columns), weights.width
        if single:
            split = [projected[..., i * width : (i + 1) * width] for i in range(3)]
        elif weights.out_proj is None:  # the wrapper: each head's [q | k | v] side by side
            per_head = projected.reshape(batch, num_tokens, num_heads, 3 * width)
            per_head = per_head.transpose(0, 2, 1, 3)  # (b, H, T, 3 d_out)
            split = [per_head[..., i * width : (i + 1) * width] for i in range(3)]
        else:  # the fused class: [q | k | v], each split into its heads
            d_out = columns // 3
            split = [
                projected[..., i * d_out : (i + 1) * d_out]
                .reshape(batch, num_tokens, num_heads, width)
                .transpose(0, 2, 1, 3)  # (b, H, T, head_dim)
                for i in range(3)
            ]
        steps.update(queries=split[0], keys=split[1], values=split[2])
    steps["attention_scores"] = raw_scores[:, 0] if single else raw_scores
    if weights.scale:
        steps["scaled_scores"] = scaled_scores[:, 0] if single else scaled_scores
    if weights.causal:
        steps["mask"] = causal_mask(attention.shape[-1])
        # No dropout on the small path: the weights themselves.
        steps["weights_before_dropout"] = attention[:, 0] if single else attention
    if not single:
        batch, num_tokens, _ = heads_context.shape
        num_heads = attention.shape[1]
        steps["head_outputs"] = heads_context.reshape(batch, num_tokens, num_heads, -1).transpose(
            0, 2, 1, 3
        )  # (b, H, T, head_dim or d_out)


@lru_cache(maxsize=64)
def causal_mask(num_tokens: int) -> np.ndarray:
    """(T, T) booleans, True above the diagonal, shared and read-only."""
    mask = np.triu(np.ones((num_tokens, num_tokens), dtype=bool), k=1)
    mask.flags.writeable = False
    return mask


@njit(cache=False)
def project(x, weight, bias, out):  # pragma: no cover (compiled)
    """out = x @ weight, then + bias when it has entries, as nn.Linear's addmm adds it."""
    batch, num_tokens, n_in = x.shape
    n_out = weight.shape[1]
    for b in range(batch):
        for t in range(num_tokens):
            for j in range(n_out):
                total = np.float32(0.0)
                for i in range(n_in):
                    total += x[b, t, i] * weight[i, j]
                if bias.shape[0]:
                    total += bias[j]
                out[b, t, j] = total


@njit(cache=False)
def attend(
    projected,
    query_columns,
    key_columns,
    value_columns,
    width,
    causal,
    scale,
    weights,
    context,
    record,
    raw_scores,
    scaled_scores,
):  # pragma: no cover (compiled)
    """Each head's softmax(q k^T / scale) into weights (b, H, T, T) and its weighted values into
    its block of context (b, T, H x width); scale 0: no scaling. With `record`, the raw scores
    (every pair, the future too) and the softmax's inputs are kept as well."""
    batch, num_tokens = projected.shape[0], projected.shape[1]
    for b in range(batch):
        for h in range(query_columns.shape[0]):
            q0, k0, v0 = query_columns[h], key_columns[h], value_columns[h]
            for t in range(num_tokens):
                row = weights[b, h, t]
                largest = np.float32(-np.inf)
                for s in range(num_tokens):
                    masked = causal and s > t
                    if masked and not record:
                        score = np.float32(-np.inf)
                    else:
                        score = np.float32(0.0)
                        for k in range(width):
                            score += projected[b, t, q0 + k] * projected[b, s, k0 + k]
                        if record:
                            raw_scores[b, h, t, s] = score
                        if masked:
                            score = np.float32(-np.inf)
                        elif scale != 0:
                            score = score / scale
                        if record:
                            scaled_scores[b, h, t, s] = score
                    row[s] = score
                    largest = max(largest, score)
                total = np.float32(0.0)
                for s in range(num_tokens):
                    row[s] = np.float32(math.exp(row[s] - largest))
                    total += row[s]
                for s in range(num_tokens):
                    row[s] = row[s] / total
                for k in range(width):
                    value = np.float32(0.0)
                    for s in range(num_tokens):
                        value += row[s] * projected[b, s, v0 + k]
                    context[b, t, h * width + k] = value


def warm_up() -> None:
    """Compile both kernels for float32 inputs, as requests bring them (about a second)."""
    x = np.ones((1, 2, 2), np.float32)
    single = layout("single", True, np.ones((2, 6), np.float32), None, 1, None, None)
    for weights in (single, layout("simplified", False, None, None, 1, None, None)):
        forward(weights, x)
        forward(weights, x, steps={})
