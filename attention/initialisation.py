"""The book's weight initialisation, drawn from a per-request generator.

`torch.manual_seed(seed)` followed by the book's constructor draws from the process-wide RNG,
which concurrent requests would share. These helpers make the same draws, in the same order and
with the same functions, from a `torch.Generator` of the request's own.
"""

import math

import torch
from torch import nn


def seeded_linear(d_in: int, d_out: int, *, bias: bool, generator: torch.Generator) -> nn.Linear:
    """`nn.Linear(d_in, d_out, bias)` with `reset_parameters` drawing from `generator`.

    Made on the meta device, where its own initialisation draws nothing, then given empty
    tensors to draw into. (torch's `skip_init` does the same through `Module.to_empty`, which
    imports sympy on its first call: ~1 s and ~36 MB on a server's first request.)
    """
    layer = nn.Linear(d_in, d_out, bias=bias, device="meta")
    layer.weight = nn.Parameter(torch.empty(d_out, d_in))
    if bias:
        layer.bias = nn.Parameter(torch.empty(d_out))
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1 / math.sqrt(d_in) if d_in > 0 else 0
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer.requires_grad_(False)


def seeded_rand_parameter(d_in: int, d_out: int, *, generator: torch.Generator) -> nn.Parameter:
    """`nn.Parameter(torch.rand(d_in, d_out))`, as SelfAttention_v1 builds its matrices."""
    return nn.Parameter(torch.rand(d_in, d_out, generator=generator), requires_grad=False)
