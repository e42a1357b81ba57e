"""Tokenizers: byte-level round trips, GPT-2's real ids, and the offline ranks-file rules."""

import hashlib
import os
import pickle
import random
import shutil
import tempfile
import time

import numpy as np
import pytest

from gptjax.errors import UserError
from helpers import encode_batch
from gptjax.tokenizer import (
    GPT2_BPE_ENV,
    GPT2_BPE_URL,
    ByteTokenizer,
    get_tokenizer,
)
from helpers import needs_bpe

BPE = os.environ.get(GPT2_BPE_ENV)


def random_unicode(rng: random.Random, n: int) -> str:
    """Code points from every plane, surrogates excluded (they are not encodable text)."""
    out = []
    while len(out) < n:
        c = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x110000)])
        if not 0xD800 <= c <= 0xDFFF:
            out.append(chr(c))
    return "".join(out)



def test_byte_basics():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.dtype == np.uint16
    assert tok.spec() == {"name": "byte", "vocab_size": 257, "eot_id": 256}
    assert encode_batch(tok, ["a", "bc"]) == [[97], [98, 99]]
    assert tok.encode_array("hé").tolist() == [104, 0xC3, 0xA9]


def test_byte_round_trips_arbitrary_unicode():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for n in (0, 1, 7, 300):
        text = random_unicode(rng, n)
        assert tok.decode(tok.encode(text)) == text
    text = "emoji 🧪, CJK 漢字, combining é, RTL עברית, NUL \x00, <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.asarray(tok.encode(text))) == text  # numpy ids too


def test_byte_decode_replaces_invalid_and_shows_eot():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 104, 105]) == "\ufffdhi"
    # A character cut by an EOT is replaced on its side, not merged across.
    assert tok.decode([0xC3, 256, 0xA9]) == "\ufffd<|endoftext|>\ufffd"
    # Lone surrogates (possible in JSON text) do not crash the encoder.
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffd\ufffd\ufffdb"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])


def test_unknown_tokenizer():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


@needs_bpe
def test_gpt2_real_ids(no_network):
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.dtype == np.uint16
    # The special token's text in a document is ordinary text, never the EOT id.
    assert 50256 not in tok.encode("a<|endoftext|>b")
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    text = "def f(x):\n    return x ** 2  # ünïcödé 🧪\n"
    assert tok.decode(tok.encode(text)) == text
    assert encode_batch(tok, ["Hello world", " the"]) == [[15496, 995], [262]]
    assert tok.encode_array("Hello world").dtype == np.uint16
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([50257])
    assert pickle.loads(pickle.dumps(tok)).encode("Hello world") == [15496, 995]


@needs_bpe
def test_gpt2_from_tiktoken_cache(monkeypatch, tmp_path, no_network):
    monkeypatch.delenv(GPT2_BPE_ENV)
    name = hashlib.sha1(GPT2_BPE_URL.encode()).hexdigest()
    shutil.copy(BPE, tmp_path / name)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_gpt2_missing_file_fails_fast(monkeypatch, tmp_path, no_network):
    monkeypatch.delenv(GPT2_BPE_ENV, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        get_tokenizer("gpt2")
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert "\n" not in msg and GPT2_BPE_ENV in msg and "r50k_base.tiktoken" in msg


def test_gpt2_bad_env_file(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv(GPT2_BPE_ENV, str(tmp_path / "nope.tiktoken"))
    with pytest.raises(UserError, match="no such file"):
        get_tokenizer("gpt2")
    wrong = tmp_path / "wrong.tiktoken"
    wrong.write_text("aGVsbG8= 0\n")
    monkeypatch.setenv(GPT2_BPE_ENV, str(wrong))
    with pytest.raises(UserError, match="sha256 mismatch"):
        get_tokenizer("gpt2")


@pytest.mark.parametrize("name", ["byte", pytest.param("gpt2", marks=needs_bpe)])
def test_token_bytes_rebuild_text_split_characters_included(name: str, no_network) -> None:
    """What the playground shows: each token's bytes (tokenizer.token_bytes, the logprobs
    extension), joined, are the text's UTF-8 even where a character spans tokens."""
    from gptjax.serve.protocol import logprobs_json

    tok = get_tokenizer(name)
    text = "ünïcödé 🧪 naïve\n\tdef f():"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(len(p.decode("utf-8", errors="replace")) != len(p.decode("utf-8", "ignore"))
               for p in pieces)  # some token ends inside a character
    lp = logprobs_json(tok, ids, [None] * len(ids), [None] * len(ids), 5, 0)
    assert b"".join(bytes(b) for b in lp["token_bytes"]) == text.encode()
    assert tok.token_bytes(tok.eot_id) == b"<|endoftext|>"
