"""The arithmetic every variant shares: scores, causal mask, softmax, dropout, weighted sum.

Two paths side by side, as nanoGPT does it: the book's explicit computation, which can return
the attention weights, and PyTorch's fused `scaled_dot_product_attention`, which never holds
the T x T matrix. The fused path runs only when the weights are not wanted and no dropout is
applied: its dropout draws from another random stream than `nn.Dropout`, so it could not
reproduce the book's masks.
"""

import torch
import torch.nn.functional as F


def book_dropout(attn_weights: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Training-mode `nn.Dropout(p)`, drawing its mask from `generator` instead of the global RNG.

    The same operations as PyTorch's CPU dropout (`bernoulli_(1 - p)`, `div_(1 - p)`, multiply), so
    a generator in the state `torch.manual_seed` would leave gives the same mask, bit for bit.
    """
    if p == 0.0:
        return attn_weights  # nn.Dropout draws nothing at p = 0
    keep = torch.empty_like(attn_weights).bernoulli_(1 - p, generator=generator)
    keep.div_(1 - p)
    return attn_weights * keep


def causal_mask(num_tokens: int, window: int | None = None) -> torch.Tensor:
    """(T, T) booleans, True where query i may not see key j: the future (j > i) and, with a
    window, the keys too far back (i - j >= window)."""
    positions = torch.arange(num_tokens)
    distance = positions[:, None] - positions[None, :]  # (T, T): i - j
    hidden = distance < 0
    if window is not None:
        hidden |= distance >= window
    return hidden


def blocked_keys(
    scores_shape: torch.Size,
    *,
    causal: bool,
    padding: torch.Tensor | None,
    window: int | None = None,
) -> torch.Tensor | None:
    """Booleans broadcastable to the scores (b, ..., T, T): True where a query may not look.

    `padding` (b, T) marks padded positions: their keys are hidden from every query, which the
    causal mask alone never does. With padding, a `window` counts each item's real tokens, not
    positions, so that an item's answer is the one it gets alone.
    """
    num_tokens = scores_shape[-1]
    if padding is None:
        return causal_mask(num_tokens, window) if causal else None
    batch = padding.shape[0]
    middle = [1] * (len(scores_shape) - 3)  # the head axis, if any
    blocked = padding.view(batch, *middle, 1, num_tokens)  # (b, 1.., 1, T): padded keys
    if causal:
        blocked = blocked | causal_mask(num_tokens)
    if window is not None:
        rank = (~padding).cumsum(dim=-1)  # (b, T): each position's count of real tokens so far
        too_far = rank[:, :, None] - rank[:, None, :] >= window  # (b, T, T)
        blocked = blocked | too_far.view(batch, *middle, num_tokens, num_tokens)
    return blocked


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    causal: bool,
    scaled: bool = True,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    return_weights: bool = True,
    steps: dict[str, torch.Tensor] | None = None,
    padding: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context vectors (..., T, d_v) and, when asked, the attention weights (..., T, T).

    queries, keys: (..., T, d_k); values: (..., T, d_v). `scaled` divides the scores by sqrt(d_k)
    (section 3.4 on); the simplified attention of section 3.3 does not. A `steps` dict receives
    the intermediate tensors under the book's names (and forces the explicit path, which has them):
    `attention_scores` (raw Q K^T), `mask` (T, T; causal only), `scaled_scores` (what the softmax
    sees: masked with -inf, divided by sqrt(d_k)), `weights_before_dropout` (causal only).
    `padding` (b, T), True at padded positions, hides those keys from every query; the rows of
    padded queries are computed like any other and left to the caller to discard. A causal
    `window` also hides the keys `window` or more tokens back (sliding-window attention).
    """
    if window is not None and window >= keys.shape[-2]:
        window = None  # no key is that far back: plain causal attention, to the bit
    if not return_weights and dropout == 0.0 and steps is None:
        scale = None if scaled else 1.0
        if padding is None and window is None:
            return F.scaled_dot_product_attention(
                queries, keys, values, is_causal=causal, scale=scale
            ), None
        shape = (*queries.shape[:-1], keys.shape[-2])  # (b, ..., T, T)
        allowed = ~blocked_keys(shape, causal=causal, padding=padding, window=window)
        context_vec = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=allowed, scale=scale
        )
        return context_vec, None

    attn_scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
    if steps is not None:
        steps["attention_scores"] = attn_scores
    # With no step to keep, the fresh scores are masked and scaled in place, by the kernels that
    # do it out of place: two fewer T x T tensors to allocate and fill (12.6 MB each for 12 heads
    # of 512 tokens), pages a server otherwise faults in afresh on many requests.
    in_place = steps is None
    blocked = blocked_keys(attn_scores.shape, causal=causal, padding=padding, window=window)
    if blocked is not None:
        if in_place:
            attn_scores.masked_fill_(blocked, -torch.inf)
        else:
            attn_scores = attn_scores.masked_fill(blocked, -torch.inf)
    if causal and steps is not None:
        steps["mask"] = causal_mask(attn_scores.shape[-1], window)
    if scaled:
        if in_place:
            attn_scores.div_(keys.shape[-1] ** 0.5)
        else:
            attn_scores = attn_scores / keys.shape[-1] ** 0.5
        if steps is not None:
            steps["scaled_scores"] = attn_scores
    attn_weights = torch.softmax(attn_scores, dim=-1)
    if steps is not None and causal:
        steps["weights_before_dropout"] = attn_weights
    if dropout > 0.0:
        if generator is None:
            raise ValueError("dropout needs a seeded generator")
        attn_weights = book_dropout(attn_weights, dropout, generator)
    context_vec = attn_weights @ values  # (..., T, d_v)
    return context_vec, attn_weights if return_weights else None
