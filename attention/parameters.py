"""A module's weights by name, in the `x @ W` convention, out and back in.

Every matrix is shaped (d_in, d_out) as section 3.4.1 writes it (`keys = x @ W_key`): an
`nn.Linear` holds the transpose, so its `weight.T` goes out and comes back transposed. A layer
`W_<name>` gives `W_<name>` and its bias `b_<name>` (`b_query`, `b_key`, `b_value` with
`qkv_bias`); `out_proj`, the multi-head classes' output projection, gives `W_out_proj` and
`b_out_proj`. A class lists its layers in `projection_names` when they are not the usual four.
The wrapper's heads each have their own set, under `heads`.
"""

import copy

import torch
from torch import nn

from attention.variants import MultiHeadAttentionWrapper

# The layers of chapter 3's classes, in the order the answers list them; those a class lacks
# are skipped.
PROJECTIONS = ("W_query", "W_key", "W_value", "out_proj")

# name -> tensor (x @ W convention); the wrapper's are {"heads": [one such dict per head]}.
Parameters = dict[str, object]


def named_parameters(module: nn.Module) -> Parameters:
    """The weight matrices and biases `module` computes with; empty for `simplified`."""
    if isinstance(module, MultiHeadAttentionWrapper):
        return {"heads": [named_parameters(head) for head in module.heads]}
    named: Parameters = {}
    for attribute in projection_names(module):
        layer = getattr(module, attribute, None)
        weight, bias = names(attribute)
        if isinstance(layer, nn.Linear):
            named[weight] = layer.weight.T  # (d_in, d_out)
            if layer.bias is not None:
                named[bias] = layer.bias
        elif isinstance(layer, nn.Parameter):  # SelfAttention_v1: already (d_in, d_out)
            named[weight] = layer
    return named


def projection_names(module: nn.Module) -> tuple[str, ...]:
    return getattr(module, "projection_names", PROJECTIONS)


def names(attribute: str) -> tuple[str, str]:
    """The names of a layer's matrix and bias: W_query -> (W_query, b_query)."""
    stem = attribute.removeprefix("W_")
    return f"W_{stem}", f"b_{stem}"


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
        for attribute in projection_names(module):
            layer = getattr(module, attribute, None)
            weight, bias = names(attribute)
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(supplied[weight].T)
                if layer.bias is not None:
                    layer.bias.copy_(supplied[bias])
            elif isinstance(layer, nn.Parameter):
                layer.copy_(supplied[weight])
