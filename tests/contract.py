"""The contract as docs/api.md states it, written down once for the tests.

These are facts the tests hold the service to, stated here rather than read from the registry
under test: adding a variant adds its line to each of these.
"""

from typing import Any

VARIANTS = (
    "simplified",
    "self-attention",
    "causal",
    "multi-head",
    "grouped-query",
    "sliding-window",
    "latent",
)
SECTIONS = {
    "simplified": "3.3",
    "self-attention": "3.4",
    "causal": "3.5",
    "multi-head": "3.6",
    "grouped-query": "chapter 4 bonus, 04_gqa",
    "sliding-window": "chapter 4 bonus, 06_swa",
    "latent": "chapter 4 bonus, 05_mla",
}
IMPLEMENTATIONS = {
    "simplified": [],
    "self-attention": ["v2", "v1"],
    "causal": [],
    "multi-head": ["fused", "wrapper"],
    "grouped-query": [],
    "sliding-window": [],
    "latent": [],
}
# Weights H x T x T (multi-head), and the variants that hide later tokens (causal).
MULTI_HEAD = {"multi-head", "grouped-query", "sliding-window", "latent"}
CAUSAL = {"causal", *MULTI_HEAD}
WINDOW = 4  # sliding-window's default window_size

COMMON_DEFAULTS: dict[str, Any] = {
    "return_weights": True,
    "embedding_dim": 256,
    "context_length": 1024,
    "embedding_seed": 123,
}
WEIGHTED_DEFAULTS: dict[str, Any] = {"d_out": None, "seed": 123, "qkv_bias": False}
MULTI_HEAD_DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    **WEIGHTED_DEFAULTS,
    "dropout": 0.0,
    "num_heads": 2,
}
# The parameters each variant takes (beyond the input), with their defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    "simplified": COMMON_DEFAULTS,
    "self-attention": {**COMMON_DEFAULTS, **WEIGHTED_DEFAULTS, "implementation": "v2"},
    "causal": {**COMMON_DEFAULTS, **WEIGHTED_DEFAULTS, "dropout": 0.0},
    "multi-head": {**MULTI_HEAD_DEFAULTS, "implementation": "fused"},
    "grouped-query": {**MULTI_HEAD_DEFAULTS, "num_kv_groups": 1},
    "sliding-window": {**MULTI_HEAD_DEFAULTS, "window_size": WINDOW},
    "latent": {**MULTI_HEAD_DEFAULTS, "latent_dim": None},
}
