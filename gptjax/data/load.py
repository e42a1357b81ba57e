"""Reading a split back: its cache built when missing, checked against the checksums its build
recorded, and memory-mapped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from gptjax.config import Config
from gptjax.data.cache import ensure_cache
from gptjax.data.integrity import verify
from gptjax.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class CachedSplit:
    """A split's verified cache: its token stream and loss weights (read-only memory maps), with
    where they lie and what their manifest says, for messages about them."""

    split: str
    tokens: np.ndarray
    mask: np.ndarray | None
    path: Path
    manifest: dict

    @property
    def tokens_file(self) -> Path:
        return self.path / self.manifest["file"]

    @property
    def vocab_size(self) -> int:
        """The ids of the tokenizer that built the cache: every token must be below it."""
        return int(self.manifest["tokenizer"]["vocab_size"])


def open_split(cfg: Config, split: str) -> CachedSplit:
    """`split`'s cache ("train" or "validation"), built on first use under `cfg.data.cache_dir`
    and reused while the source, tokenizer and split rules are unchanged.

    Raises:
        DataError: unknown source, a glob matching nothing, an unprepared or unknown TFDS dataset,
            an empty split, an unwritable cache_dir, ...; CorruptCacheError (a DataError) when a
            file of the cache was changed after it was built.
    """
    manifest, path, _ = ensure_cache(cfg, split)
    if manifest["tokens"] == 0:
        rule = (
            f" (data.val_fraction={cfg.data.val_fraction} selected no document)"
            if split == "validation" and not cfg.data.source.startswith("tfds:")
            else ""
        )
        raise DataError(f"the {split} split of data.source={cfg.data.source!r} is empty{rule}")
    # A stat per file when nothing changed since the last check (a build stamps its own files).
    verify(path, manifest)
    n = manifest["tokens"]
    tokens = np.memmap(path / manifest["file"], dtype=manifest["dtype"], mode="r", shape=(n,))
    mask = None
    if manifest.get("mask"):
        mask = np.memmap(path / manifest["mask"], dtype=np.uint8, mode="r", shape=(n,))
    return CachedSplit(split, tokens, mask, path, manifest)


def load_split(cfg: Config, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(`load_tokens`, `load_mask`) of `split` from one look at the cache."""
    opened = open_split(cfg, split)
    return opened.tokens, opened.mask


def load_tokens(cfg: Config, split: str) -> np.ndarray:
    """The token stream of `split` ("train" or "validation"): documents joined by end-of-text.

    Builds the cache under `cfg.data.cache_dir` on first use and reuses it while the source,
    tokenizer and split rules are unchanged.

    Returns:
        A read-only uint16 (vocab ≤ 65536) or uint32 memory map.

    Raises:
        DataError: unknown source, a glob matching nothing, an unprepared or unknown TFDS dataset,
            an empty split, a cache file changed after it was built, ...
    """
    return load_split(cfg, split)[0]


def load_mask(cfg: Config, split: str) -> np.ndarray | None:
    """The loss weights of `split`'s tokens, parallel to `load_tokens`: a read-only uint8 memory
    map (0 on prompt tokens of prompt/completion records, 1 elsewhere), or None when every weight
    is 1 (no such record). Position i weighs the prediction of token i, i.e. a target."""
    return load_split(cfg, split)[1]
