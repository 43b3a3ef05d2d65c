"""A module's weights by name, in the `x @ W` convention, out and back in.

Every matrix is shaped (d_in, d_out) as section 3.4.1 writes it (`keys = x @ W_key`): an
`nn.Linear` holds the transpose, so its `weight.T` goes out and comes back transposed. Biases are
`b_query`, `b_key`, `b_value` (with `qkv_bias`) and `b_out_proj`; `W_out_proj` is the fused
multi-head class's output projection. The wrapper's heads each have their own set, under `heads`.
"""

import copy

import torch
from torch import nn

from attention.variants import MultiHeadAttentionWrapper

PROJECTIONS = ("query", "key", "value", "out_proj")

# name -> tensor (x @ W convention); the wrapper's are {"heads": [one such dict per head]}.
Parameters = dict[str, object]


def named_parameters(module: nn.Module) -> Parameters:
    """The weight matrices and biases `module` computes with; empty for `simplified`."""
    if isinstance(module, MultiHeadAttentionWrapper):
        return {"heads": [named_parameters(head) for head in module.heads]}
    named: Parameters = {}
    for projection in PROJECTIONS:
        attribute = "out_proj" if projection == "out_proj" else f"W_{projection}"
        layer = getattr(module, attribute, None)
        if isinstance(layer, nn.Linear):
            named[f"W_{projection}"] = layer.weight.T  # (d_in, d_out)
            if layer.bias is not None:
                named[f"b_{projection}"] = layer.bias
        elif isinstance(layer, nn.Parameter):  # SelfAttention_v1: already (d_in, d_out)
            named[f"W_{projection}"] = layer
    return named


def parameter_shapes(module: nn.Module) -> dict[str, object]:
    """The shapes `with_parameters` expects, in the same layout as `named_parameters`."""

    def shapes(named: Parameters) -> dict[str, object]:
        return {
            name: [shapes(head) for head in value] if name == "heads" else list(value.shape)
            for name, value in named.items()
        }

    return shapes(named_parameters(module))


def with_parameters(module: nn.Module, supplied: Parameters) -> nn.Module:
    """A copy of `module` computing with `supplied` (float32 tensors, shapes already checked)."""
    loaded = copy.deepcopy(module)
    load(loaded, supplied)
    return loaded


def load(module: nn.Module, supplied: Parameters) -> None:
    if isinstance(module, MultiHeadAttentionWrapper):
        for head, own in zip(module.heads, supplied["heads"], strict=True):
            load(head, own)
        return
    with torch.no_grad():
        for projection in PROJECTIONS:
            attribute = "out_proj" if projection == "out_proj" else f"W_{projection}"
            layer = getattr(module, attribute, None)
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(supplied[f"W_{projection}"].T)
                if layer.bias is not None:
                    layer.bias.copy_(supplied[f"b_{projection}"])
            elif isinstance(layer, nn.Parameter):
                layer.copy_(supplied[f"W_{projection}"])
