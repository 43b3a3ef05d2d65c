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


def causal_mask(num_tokens: int) -> torch.Tensor:
    """(T, T) booleans, True above the diagonal: the future positions a query may not see."""
    return torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), diagonal=1)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context vectors (..., T, d_v) and, when asked, the attention weights (..., T, T).

    queries, keys: (..., T, d_k); values: (..., T, d_v). `scaled` divides the scores by sqrt(d_k)
    (section 3.4 on); the simplified attention of section 3.3 does not. A `steps` dict receives
    the intermediate tensors under the book's names (and forces the explicit path, which has them):
    `attention_scores` (raw Q K^T), `mask` (T, T; causal only), `scaled_scores` (what the softmax
    sees: masked with -inf, divided by sqrt(d_k)), `weights_before_dropout` (causal only).
    """
    if not return_weights and dropout == 0.0 and steps is None:
        context_vec = F.scaled_dot_product_attention(
            queries, keys, values, is_causal=causal, scale=None if scaled else 1.0
        )
        return context_vec, None

    attn_scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
    if steps is not None:
        steps["attention_scores"] = attn_scores
    if causal:
        mask = causal_mask(attn_scores.shape[-1])
        attn_scores = attn_scores.masked_fill(mask, -torch.inf)
        if steps is not None:
            steps["mask"] = mask
    if scaled:
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
