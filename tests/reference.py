"""Our own reference for every variant: the seeded weight matrices, then plain tensor algebra.

Formulated for the tests from two kinds of fact, never from the book's code or from
`attention/`:

- how the weights are drawn: `torch.manual_seed(seed)`, then the projections in the order the
  book's constructor makes them, each an `nn.Linear` (its weight drawn, then its bias) or, for
  `SelfAttention_v1`, a `torch.rand(d_in, d_out)` matrix. They are kept as `x @ W` matrices
  (d_in x d_out), under the names the service's `parameters` step uses;
- the formulas: per head, scores = Q K^T; hidden pairs set to -inf; divided by the square root
  of the head's width (all but section 3.3); softmax over the keys; then dropout as a
  training-mode `nn.Dropout` draws it, from the global generator, which goes on from where the
  weights' draws left it; context = weights V.

Everything here runs on plain tensors: einsum, reshape and softmax.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Parameters = dict[str, Any]  # name -> (d_in, d_out) matrix or bias; the wrapper's {"heads": [...]}


@dataclass(frozen=True)
class Config:
    """One computation as a request states it; defaults as the service's."""

    variant: str
    implementation: str | None = None
    d_out: int | None = None  # None: d_in
    num_heads: int = 2  # multi-head only
    seed: int = 123
    qkv_bias: bool = False
    dropout: float = 0.0
    num_kv_groups: int = 1  # grouped-query
    window_size: int = 4  # sliding-window
    latent_dim: int | None = None  # latent; None: max(16, d_out // 8)

    @property
    def multi_head(self) -> bool:
        return self.variant not in ("simplified", "self-attention", "causal")


@dataclass
class Result:
    context: torch.Tensor  # (b, T, output width)
    weights: torch.Tensor  # (b, T, T); multi-head (b, H, T, T)
    steps: dict[str, Any] = field(default_factory=dict)  # by the service's step names


# --- weights -----------------------------------------------------------------------------------


def linear(fan_in: int, fan_out: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One nn.Linear's draws from the global generator, as (x @ W matrix, bias or None)."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    return layer.weight.detach().T.clone(), None if layer.bias is None else layer.bias.detach()


def projections(names: tuple[str, ...], fan_in: int, fan_out: int, bias: bool) -> Parameters:
    drawn: Parameters = {}
    for name in names:
        drawn[f"W_{name}"], b = linear(fan_in, fan_out, bias)
        if b is not None:
            drawn[f"b_{name}"] = b
    return drawn


QKV = ("query", "key", "value")


def draw(config: Config, d_in: int) -> Parameters:
    """The weights `torch.manual_seed(config.seed)` and the constructor leave, in draw order."""
    d_out = config.d_out or d_in
    torch.manual_seed(config.seed)
    match (config.variant, config.implementation):
        case ("self-attention", "v1"):  # three torch.rand matrices, query first
            return {f"W_{name}": torch.rand(d_in, d_out) for name in QKV}
        case ("self-attention", _) | ("causal", _):
            return projections(QKV, d_in, d_out, config.qkv_bias)
        case ("multi-head", "wrapper"):  # one causal head after another
            return {
                "heads": [
                    projections(QKV, d_in, d_out, config.qkv_bias) for _ in range(config.num_heads)
                ]
            }
        case ("multi-head", _) | ("sliding-window", _):
            drawn = projections(QKV, d_in, d_out, config.qkv_bias)
            drawn["W_out_proj"], drawn["b_out_proj"] = linear(d_out, d_out, bias=True)
            return drawn
        case ("grouped-query", _):  # keys and values first, each num_kv_groups heads wide
            group_width = config.num_kv_groups * d_out // config.num_heads
            drawn = projections(("key", "value"), d_in, group_width, config.qkv_bias)
            drawn |= projections(("query",), d_in, d_out, config.qkv_bias)
            drawn["W_out_proj"], _ = linear(d_out, d_out, bias=False)
            return in_order(drawn, ("query", "key", "value", "out_proj"))
        case ("latent", _):
            latent_dim = latent_width(config, d_out)
            drawn = projections(("query",), d_in, d_out, config.qkv_bias)
            drawn |= projections(("DKV",), d_in, latent_dim, config.qkv_bias)
            drawn |= projections(("UK", "UV"), latent_dim, d_out, config.qkv_bias)
            drawn["W_out_proj"], drawn["b_out_proj"] = linear(d_out, d_out, bias=True)
            return drawn
    raise AssertionError(f"no weights for {config}")


def latent_width(config: Config, d_out: int) -> int:
    return config.latent_dim if config.latent_dim is not None else max(16, d_out // 8)


def in_order(drawn: Parameters, stems: tuple[str, ...]) -> Parameters:
    """The weights listed as the answers list them (the draw order may differ)."""
    return {
        f"{kind}_{stem}": drawn[f"{kind}_{stem}"]
        for stem in stems
        for kind in ("W", "b")
        if f"{kind}_{stem}" in drawn
    }


# --- the arithmetic ----------------------------------------------------------------------------


def causal_hidden(num_tokens: int, window: int | None = None) -> torch.Tensor:
    """(T, T): True where key j lies after query i or, with a window, i - j >= window."""
    i = torch.arange(num_tokens)
    hidden = i[None, :] > i[:, None]
    if window is not None:
        hidden |= i[:, None] - i[None, :] >= window
    return hidden


def project(x: torch.Tensor, parameters: Parameters, name: str) -> torch.Tensor:
    """x (b, T, d_in) @ W, plus the bias when there is one."""
    out = torch.einsum("btd,de->bte", x, parameters[f"W_{name}"])
    bias = parameters.get(f"b_{name}")
    return out if bias is None else out + bias


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, num_tokens, width = t.shape
    return t.reshape(b, num_tokens, num_heads, width // num_heads).permute(0, 2, 1, 3)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, num_heads, num_tokens, width = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, num_tokens, num_heads * width)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor | None,
    *,
    scaled: bool = True,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """q, k, v: (..., T, width); hidden: (T, T) or None. (context, every step by name)."""
    scores = torch.einsum("...id,...jd->...ij", q, k)
    masked = scores if hidden is None else scores.masked_fill(hidden, -math.inf)
    softmax_input = masked / math.sqrt(k.shape[-1]) if scaled else masked
    weights = torch.softmax(softmax_input, dim=-1)
    dropped = F.dropout(weights, dropout, training=True) if dropout else weights
    context = torch.einsum("...ij,...jd->...id", dropped, v)
    steps = {
        "queries": q,
        "keys": k,
        "values": v,
        "attention_scores": scores,
        "scaled_scores": softmax_input,
        "weights_before_dropout": weights,
        "weights": dropped,
    }
    if hidden is not None:
        steps["mask"] = hidden
    return context, steps


def run(config: Config, x: torch.Tensor, parameters: Parameters | None = None) -> Result:
    """The variant on x (b, T, d_in). `parameters` replace the drawn weights after the draws, so
    dropout still continues the seed's stream."""
    with torch.no_grad():
        return _run(config, x, parameters)


def _run(config: Config, x: torch.Tensor, supplied: Parameters | None) -> Result:
    num_tokens = x.shape[1]
    if config.variant == "simplified":  # section 3.3: the inputs themselves, unscaled
        context, steps = attention(x, x, x, None, scaled=False)
        return Result(context, steps["weights"], {"attention_scores": steps["attention_scores"]})

    drawn = draw(config, x.shape[-1])
    parameters = drawn if supplied is None else supplied
    causal = config.variant != "self-attention"
    window = config.window_size if config.variant == "sliding-window" else None
    hidden = causal_hidden(num_tokens, window) if causal else None
    own_steps = ["queries", "keys", "values", "attention_scores", "scaled_scores"]
    if causal:
        own_steps += ["mask", "weights_before_dropout"]
    extra: dict[str, torch.Tensor] = {}

    if config.implementation == "wrapper":  # heads in order: each draws its dropout in turn
        per_head = []
        for head in parameters["heads"]:
            q, k, v = (project(x, head, name) for name in QKV)
            per_head.append(attention(q, k, v, hidden, dropout=config.dropout))
        head_outputs = torch.stack([context for context, _ in per_head], dim=1)  # (b, H, T, d)
        steps = {
            name: torch.stack([own[name] for _, own in per_head], dim=1)
            for name in [*own_steps, "weights"]
            if name != "mask"
        }
        steps["mask"] = hidden
        context = merge_heads(head_outputs)  # (b, T, H * d_out)
    elif config.multi_head:
        heads = config.num_heads
        q = split_heads(project(x, parameters, "query"), heads)
        if config.variant == "grouped-query":
            group_keys = split_heads(project(x, parameters, "key"), config.num_kv_groups)
            group_values = split_heads(project(x, parameters, "value"), config.num_kv_groups)
            group_of_head = torch.arange(heads) // (heads // config.num_kv_groups)
            k, v = group_keys[:, group_of_head], group_values[:, group_of_head]
            extra = {"group_keys": group_keys, "group_values": group_values}
        elif config.variant == "latent":
            latent = project(x, parameters, "DKV")  # (b, T, latent_dim)
            k = split_heads(project(latent, parameters, "UK"), heads)
            v = split_heads(project(latent, parameters, "UV"), heads)
            extra = {"latent": latent}
        else:
            k, v = (split_heads(project(x, parameters, name), heads) for name in QKV[1:])
        head_outputs, steps = attention(q, k, v, hidden, dropout=config.dropout)
        context = project(merge_heads(head_outputs), parameters, "out_proj")
    else:
        q, k, v = (project(x, parameters, name) for name in QKV)
        context, steps = attention(q, k, v, hidden, dropout=config.dropout)

    chosen = {name: steps[name] for name in own_steps} | extra
    if config.multi_head:
        chosen["head_outputs"] = head_outputs
    chosen["parameters"] = parameters
    return Result(context, steps["weights"], chosen)
