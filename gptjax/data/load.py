"""Reading a split back: its cache built when missing, checked against the checksums its build
recorded (on a local disk), and opened as one array over its shards: memory maps, or ranged reads
of a URL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from gptjax.config import Config
from gptjax.data.cache import ensure_cache
from gptjax.data.integrity import verify
from gptjax.data.sources import DataError
from gptjax.data.store import Store, TokenArray, is_url


@dataclasses.dataclass(frozen=True)
class CachedSplit:
    """A split's verified cache: its token stream and loss weights (read-only arrays over the
    shards), with where they lie and what their manifest says, for messages about them."""

    split: str
    tokens: TokenArray
    mask: TokenArray | None
    path: Path | str
    manifest: dict

    def locate(self, position: int) -> tuple[str, int]:
        """(the shard file holding token `position` of the stream, its index in that file)."""
        for s in self.manifest["shards"]:
            if position < s["tokens"]:
                return f"{self.path}/{s['file']}", position
            position -= s["tokens"]
        raise IndexError(position)

    @property
    def vocab_size(self) -> int:
        """The ids of the tokenizer that built the cache: every token must be below it."""
        return int(self.manifest["tokenizer"]["vocab_size"])


def open_split(cfg: Config, split: str, process_index: int | None = None) -> CachedSplit:
    """`split`'s cache ("train" or "validation"), built on first use under `cfg.data.cache_dir`
    and reused while the source, tokenizer and split rules are unchanged. With a URL as
    cache_dir, process `process_index` (default: JAX's) builds only when it is 0.

    Raises:
        DataError: unknown source, a glob matching nothing, an unprepared or unknown TFDS dataset,
            an empty split, an unwritable cache_dir, ...; CorruptCacheError (a DataError) when a
            file of the cache was changed after it was built.
    """
    if process_index is None and is_url(cfg.data.cache_dir):  # only a URL has a builder
        import jax

        process_index = jax.process_index()
    manifest, path, _ = ensure_cache(cfg, split, process_index=process_index or 0)
    if manifest["tokens"] == 0:
        rule = (
            f" (data.val_fraction={cfg.data.val_fraction} selected no document)"
            if split == "validation" and not cfg.data.source.startswith("tfds:")
            else ""
        )
        raise DataError(f"the {split} split of data.source={cfg.data.source!r} is empty{rule}")
    store = Store(path)
    if not store.remote:
        # A stat per file when nothing changed since the last check (a build stamps its files).
        # An object store checks its objects' own checksums on every transfer instead.
        verify(Path(path), manifest)
    shards = manifest["shards"]
    lengths = [s["tokens"] for s in shards]
    tokens = TokenArray([store.array(s["file"], manifest["dtype"], s["tokens"]) for s in shards],
                        lengths, manifest["dtype"])
    mask = None
    if manifest["mask"]:
        mask = TokenArray([store.array(s["mask"], np.uint8, s["tokens"]) if s["mask"] else None
                           for s in shards], lengths, np.uint8, fill=1)
    return CachedSplit(split, tokens, mask, path, manifest)


def load_split(cfg: Config, split: str) -> tuple[TokenArray, TokenArray | None]:
    """(`load_tokens`, `load_mask`) of `split` from one look at the cache."""
    opened = open_split(cfg, split)
    return opened.tokens, opened.mask


def load_tokens(cfg: Config, split: str) -> TokenArray:
    """The token stream of `split` ("train" or "validation"): documents joined by end-of-text.

    Builds the cache under `cfg.data.cache_dir` on first use and reuses it while the source,
    tokenizer and split rules are unchanged.

    Returns:
        A read-only uint16 (vocab ≤ 65536) or uint32 array over the cache's shards: slices and
        `np.asarray` give numpy arrays, read from memory maps (or ranged reads of a URL).

    Raises:
        DataError: unknown source, a glob matching nothing, an unprepared or unknown TFDS dataset,
            an empty split, a cache file changed after it was built, ...
    """
    return load_split(cfg, split)[0]


def load_mask(cfg: Config, split: str) -> TokenArray | None:
    """The loss weights of `split`'s tokens, parallel to `load_tokens`: a read-only uint8 array
    (0 on prompt tokens of prompt/completion records, 1 elsewhere), or None when every weight
    is 1 (no such record). Position i weighs the prediction of token i, i.e. a target."""
    return load_split(cfg, split)[1]
