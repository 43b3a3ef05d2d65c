"""The attention mechanisms of chapter 3 of *Build a Large Language Model From Scratch*."""

from attention.embeddings import EmbeddingTables
from attention.errors import AnswerOverflowError, AttentionInputError
from attention.registry import STEPS, VARIANTS, AttentionConfig, Variant
from attention.runner import AttentionResult, AttentionRunner
from attention.tokenizer import Token, gpt2_encoding, tokenize

__all__ = [
    "STEPS",
    "VARIANTS",
    "AnswerOverflowError",
    "AttentionConfig",
    "AttentionInputError",
    "AttentionResult",
    "AttentionRunner",
    "EmbeddingTables",
    "Token",
    "Variant",
    "gpt2_encoding",
    "tokenize",
]
