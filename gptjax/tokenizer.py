"""Tokenizers behind one small interface: byte-level (the offline default) and GPT-2's BPE.

GPT-2 and GPT-3 share one BPE vocabulary, tiktoken's `r50k_base` (50257 ids, `<|endoftext|>` =
50256). Its ranks file is never downloaded here: it comes from `GPTJAX_GPT2_BPE` or tiktoken's own
cache, and when neither has it the user gets one line saying how to provide it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.errors import UserError

EOT_TEXT = "<|endoftext|>"
GPT2_BPE_ENV = "GPTJAX_GPT2_BPE"
GPT2_BPE_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
TOKENIZERS = ("byte", "gpt2")


class Tokenizer:
    """Text ↔ token ids. Subclasses set `name`, `vocab_size` and `eot_id` (end of text)."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; an `<|endoftext|>` inside the text is ordinary text, not the EOT id."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD and the EOT id `<|endoftext|>`."""
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The bytes one id stands for (a character may span several ids); the EOT id's are
        `<|endoftext|>`'s."""
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """Like `encode`, as a uint16/uint32 array (the token cache's fast path)."""
        return np.asarray(self.encode(text), dtype=self.dtype)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def spec(self) -> dict[str, Any]:
        """What is recorded next to stored tokens (caches, checkpoints) to catch mismatches."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of range for the {self.name} tokenizer "
                f"(vocab {self.vocab_size})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0–255, plus the end-of-text id 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    # A lone surrogate (possible in str, e.g. from JSON) becomes bytes that decode to U+FFFD.
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_array(self, text: str) -> np.ndarray:
        data = text.encode("utf-8", errors="surrogatepass")
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if self.eot_id not in ids:
            return bytes(ids).decode("utf-8", errors="replace")
        # Decode the byte runs between EOTs separately, so an EOT never splits a character's
        # replacement in two.
        parts, run = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                parts += [run.decode("utf-8", errors="replace"), EOT_TEXT]
                run = bytearray()
            else:
                run.append(i)
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_bytes(self, i: int) -> bytes:
        self._check_ids([i])
        return EOT_TEXT.encode() if i == self.eot_id else bytes([i])

    def __reduce__(self) -> tuple:
        return (ByteTokenizer, ())


class GPT2Tokenizer(Tokenizer):
    """GPT-2/GPT-3 BPE: tiktoken's `r50k_base`, built from a local ranks file."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self, ranks_path: str | Path):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str

        self.ranks_path = str(ranks_path)
        self._enc = tiktoken.Encoding(
            name="r50k_base",
            pat_str=r50k_pat_str,
            mergeable_ranks=_read_ranks(self.ranks_path),
            special_tokens={EOT_TEXT: self.eot_id},
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, i: int) -> bytes:
        self._check_ids([i])
        return self._enc.decode_single_token_bytes(i)

    def __reduce__(self) -> tuple:
        # Worker processes rebuild the encoder from the same file instead of pickling 50k ranks.
        return (_gpt2_from_path, (self.ranks_path,))


def _read_ranks(path: str) -> dict[bytes, int]:
    """Parses a `.tiktoken` file: one `base64(token) rank` pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiktoken_cache_candidates() -> list[Path]:
    """Where tiktoken itself caches the ranks file (the same rules as its loader)."""
    name = hashlib.sha1(GPT2_BPE_URL.encode()).hexdigest()
    dirs = [os.environ.get("TIKTOKEN_CACHE_DIR"), os.environ.get("DATA_GYM_CACHE_DIR")]
    dirs.append(os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    return [Path(d) / name for d in dirs if d]


def find_gpt2_bpe() -> Path:
    """The local r50k_base ranks file: `$GPTJAX_GPT2_BPE`, else tiktoken's cache; never the network.

    Raises:
        UserError: when no valid file is found (one line telling how to provide it).
    """
    how = (
        f"download {GPT2_BPE_URL} on a machine with network and set "
        f"{GPT2_BPE_ENV}=/path/to/r50k_base.tiktoken"
    )
    given = os.environ.get(GPT2_BPE_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"{GPT2_BPE_ENV}={given}: no such file; {how}")
        if _sha256(path) != GPT2_BPE_SHA256:
            raise UserError(
                f"{GPT2_BPE_ENV}={given} is not r50k_base.tiktoken (sha256 mismatch); {how}"
            )
        return path
    for path in _tiktoken_cache_candidates():
        if path.is_file() and _sha256(path) == GPT2_BPE_SHA256:
            return path
    raise UserError(f"the gpt2 tokenizer needs the r50k_base.tiktoken ranks file: {how}")


# name -> class: its vocab_size and eot_id are facts of the class, known without a ranks file.
TOKENIZER_CLASSES: dict[str, type[Tokenizer]] = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}


@functools.lru_cache(maxsize=4)
def _gpt2_from_path(path: str) -> GPT2Tokenizer:
    return GPT2Tokenizer(path)


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name`: "byte" (vocab 257, EOT 256) or "gpt2" (50257, EOT 50256).

    Raises:
        UserError: for an unknown name, or "gpt2" without a local ranks file.
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return _gpt2_from_path(str(find_gpt2_bpe()))
    raise UserError(f"unknown tokenizer {name!r} (use {' or '.join(TOKENIZERS)})")
