"""What a split's token cache holds: the plan of one build (its files or TFDS split, tokenizer
and split rule) and the digest of everything that decides its contents, which names its directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from gptjax.config import Config
from gptjax.data.sources import (
    DataError,
    FileUnit,
    glob_units,
    in_validation,
    parse_tfds,
    stat_units,
    stdlib_files,
    tfds_builder_dir,
)
from gptjax.tokenizer import Tokenizer

SPLITS = ("train", "validation")
CACHE_FORMAT = 2  # 2: tokens in shards, built resumably
# Bumped when the rule that turns .jsonl records into tokens and weights changes. Only plans with
# .jsonl files put it in their digest, so caches of other sources keep their names; caches built
# before records could be prompt/completion pairs lack it and are never found.
JSONL_RULE = 2  # 2: a record's split follows its `id` field when it has one


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything needed to (re)build one split's cache, and the digest that names it."""

    source: str
    split: str
    tokenizer: Tokenizer
    kind: str  # stdlib | files | tfds
    units: tuple[FileUnit, ...] = ()
    tfds_dir: str = ""
    tfds_split: str = ""
    text_key: str = "text"
    val_fraction: float = 0.0
    fingerprint: tuple = ()
    approx_bytes: int = 0  # of text, to decide whether worker processes pay off

    def digest(self) -> str:
        blob = json.dumps(
            {
                "format": CACHE_FORMAT,
                "source": self.source,
                "split": self.split,
                "tokenizer": self.tokenizer.spec(),
                "kind": self.kind,
                "text_key": self.text_key,
                "val_fraction": self.val_fraction,
                "fingerprint": self.fingerprint,
                **({"jsonl_rule": JSONL_RULE} if self.has_jsonl else {}),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def has_jsonl(self) -> bool:
        return any(u.records for u in self.units)

    def dir_name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_]+", "_", self.source).strip("_")[:40] or "source"
        return f"{slug}.{self.split}.{self.tokenizer.name}.{self.digest()[:16]}"


def make_plan(cfg: Config, split: str, tokenizer: Tokenizer) -> Plan:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = cfg.data
    source = d.source.strip()
    if source.startswith("tfds:"):
        spec = parse_tfds(source, d.tfds_data_dir)
        builder_dir = tfds_builder_dir(spec)
        info = (builder_dir / "dataset_info.json").read_bytes()
        tfds_split = d.train_split if split == "train" else d.val_split
        try:
            approx = sum(int(s.get("numBytes", 0)) for s in json.loads(info).get("splits", []))
        except (ValueError, AttributeError, TypeError):
            approx = 0
        return Plan(
            source=source,
            split=split,
            tokenizer=tokenizer,
            kind="tfds",
            tfds_dir=os.fspath(builder_dir),
            tfds_split=tfds_split,
            text_key=d.text_key,
            # A re-prepared dataset has a new dataset_info.json and so a new cache.
            fingerprint=(os.fspath(builder_dir), tfds_split, hashlib.sha256(info).hexdigest()),
            approx_bytes=approx,
        )
    if split == "validation" and d.val_fraction == 0:
        raise DataError(f"data.val_fraction=0: data.source={source!r} has no validation split")
    if source == "stdlib":
        units = stat_units(stdlib_files())
        kind = "stdlib"
    else:
        units = glob_units(source)
        kind = "files"
    # .txt files are split whole here; .jsonl files go to both splits and are split by line.
    want_val = split == "validation"
    keep = [u for u in units if u.records or in_validation(u.key, d.val_fraction) == want_val]
    return Plan(
        source=source,
        split=split,
        tokenizer=tokenizer,
        kind=kind,
        units=tuple(keep),
        text_key=d.text_key,
        val_fraction=d.val_fraction,
        # Edited, added or removed files give a new cache.
        fingerprint=tuple((u.key, u.size, u.mtime_ns) for u in keep),
        approx_bytes=sum(u.size for u in keep),
    )


def num_workers(cfg: Config) -> int:
    """Tokenizer processes: `data.num_workers`, or one per usable core when it is 0."""
    if cfg.data.num_workers:
        return cfg.data.num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


