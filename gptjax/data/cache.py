"""The token cache: each split of a source is tokenized once into a directory named by a digest
of everything that decides its contents (a token file, a loss-weight file when the source has
prompt/completion records, a JSON manifest with their checksums, and the stamp of integrity.py),
built atomically; load.py reads it back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptjax.config import Config
from gptjax.data.encode import (
    Encoded,
    Job,
    file_jobs,
    init_worker,
    run_in_worker,
    text_jobs,
)
from gptjax.data.integrity import HashingWriter, stamp_built
from gptjax.data.sources import (
    DataError,
    FileUnit,
    glob_units,
    in_validation,
    parse_tfds,
    stat_units,
    stdlib_files,
    tfds_builder_dir,
    tfds_documents,
)
from gptjax.tokenizer import Tokenizer, get_tokenizer

SPLITS = ("train", "validation")
CACHE_FORMAT = 1
TOKENS_FILE = "tokens.bin"
MANIFEST_FILE = "manifest.json"
# Loss weights, one uint8 per token (the weight of predicting that token); only for sources with
# prompt/completion records. Plain text has all-ones weights and stores none.
MASK_FILE = "mask.bin"
# Bumped when the rule that turns .jsonl records into tokens and weights changes. Only plans with
# .jsonl files put it in their digest, so caches of other sources keep their names; caches built
# before records could be prompt/completion pairs lack it and are never found.
JSONL_RULE = 2  # 2: a record's split follows its `id` field when it has one
# Below this much text (and for the byte tokenizer, which is faster than the pickling a process
# pool adds) tokenization stays in this process: starting workers would cost more than it saves.
PARALLEL_MIN_BYTES = 32 << 20


# ---------------------------------------------------------------------------------------------
# What a split's cache holds


@dataclasses.dataclass(frozen=True)
class _Plan:
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


def _plan(cfg: Config, split: str, tokenizer: Tokenizer) -> _Plan:
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
        return _Plan(
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
    return _Plan(
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


# ---------------------------------------------------------------------------------------------
# Tokenizer processes


def num_workers(cfg: Config) -> int:
    """Tokenizer processes: `data.num_workers`, or one per usable core when it is 0."""
    if cfg.data.num_workers:
        return cfg.data.num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _encode_all(tok: Tokenizer, jobs: Iterable[Job], workers: int) -> Iterator[Encoded]:
    """Runs the jobs in order, in `workers` spawned processes when workers > 1. At most two jobs
    per worker are in flight, so a huge source never queues up in memory."""
    if workers <= 1:
        for fn, args in jobs:
            yield fn(tok, *args)
        return
    # spawn, not fork: the parent usually has JAX's and TF's threads running.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker, initargs=(tok,)
    ) as pool:
        pending: collections.deque = collections.deque()
        try:
            for fn, args in jobs:
                pending.append(pool.submit(run_in_worker, fn, args))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _jobs(plan: _Plan, progress: Any) -> Iterator[Job]:
    """The plan's tokenizer jobs: chunks of its files, or of its TFDS split's texts."""
    if plan.kind == "tfds":
        return text_jobs(
            tfds_documents(
                plan.tfds_dir,
                plan.tfds_split,
                plan.text_key,
                source=plan.source,
                split=plan.split,
                progress=progress,
            )
        )
    return file_jobs(plan.units, plan.split, plan.val_fraction, plan.text_key)


# ---------------------------------------------------------------------------------------------
# Building and loading


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        size = (path / manifest["file"]).stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if size != manifest["tokens"] * np.dtype(manifest["dtype"]).itemsize:
        return None
    if manifest.get("mask"):
        try:
            if (path / manifest["mask"]).stat().st_size != manifest["tokens"]:
                return None
        except (OSError, TypeError):
            return None
    return manifest


def _manifest_matches(manifest: dict | None, plan: _Plan) -> bool:
    return (
        manifest is not None
        and manifest.get("format") == CACHE_FORMAT
        and manifest.get("digest") == plan.digest()
        and manifest.get("tokenizer") == plan.tokenizer.spec()
        # Each data file's checksum is what loads verify it by; a cache built before loss weights
        # had one is rebuilt once rather than trusted unchecked.
        and "sha256" in manifest
        and (not manifest.get("mask") or "mask_sha256" in manifest)
        # .jsonl records may be prompt/completion pairs: only a build that looked for them (and
        # says whether it found any) can stand for such a source.
        and (not plan.has_jsonl or "mask" in manifest)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_builds(cache_dir: Path, name: str) -> None:
    """Deletes temporary directories of builds of `name` on this host whose process is gone."""
    host = socket.gethostname()
    for tmp in cache_dir.glob(f".tmp.{name}.*"):
        parts = tmp.name[len(f".tmp.{name}.") :].split(".")
        dead = len(parts) >= 3 and parts[0] == host and parts[1].isdigit()
        if dead and not _pid_alive(int(parts[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def _build(plan: _Plan, final: Path, workers: int) -> dict:
    """Tokenizes the plan into a temporary directory, then renames it to `final` (atomic: an
    interrupted build never leaves a directory that looks complete)."""
    tmp = _new_build_dir(final)
    start = time.perf_counter()
    if plan.tokenizer.name == "byte" or plan.approx_bytes < PARALLEL_MIN_BYTES:
        workers = 1  # byte tokenization outruns the pickling a process pool adds
    try:
        with _progress_bar(plan) as bar:
            written = _write_split(plan, tmp, workers, bar)
        manifest = _manifest(plan, written, time.perf_counter() - start)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        stamp_built(tmp, manifest)  # so that the first load need not hash what was just written
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (a second host process, say) finished the same build first.
            if not _manifest_matches(_read_manifest(final), plan):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return _read_manifest(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(plan, manifest, final)
    return manifest


def _new_build_dir(final: Path) -> Path:
    """An empty directory beside `final`, named for this host and process so that a later build
    can tell when its builder is gone."""
    cache_dir = final.parent
    tag = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = cache_dir / f".tmp.{final.name}.{tag}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(cache_dir, final.name)
        tmp.mkdir()
    except OSError as e:
        if cache_dir.exists() and not cache_dir.is_dir():
            why = "is not a directory"
        else:
            why = f"cannot be written ({e.strerror or e})"
        raise DataError(
            f"data.cache_dir={cache_dir} {why}, and the token cache {final.name} must be built "
            "there; set data.cache_dir to a writable directory"
        ) from None
    return tmp


def _progress_bar(plan: _Plan) -> tqdm:
    """Bytes of files, or TFDS documents (the reader sets their total when the split has one)."""
    files = plan.kind != "tfds"
    return tqdm(
        total=sum(u.size for u in plan.units) if files else None,
        unit="B" if files else " docs",
        unit_scale=True,
        desc=f"tokenizing {plan.source} ({plan.split}, {plan.tokenizer.name})",
        file=sys.stderr,
        mininterval=0.5,
        leave=False,
    )


def _write_split(plan: _Plan, tmp: Path, workers: int, bar: tqdm) -> dict:
    """Writes the tokens of the plan's jobs to `tmp`, and their loss weights from the first chunk
    that has any; returns what the manifest says about them."""
    tok = plan.tokenizer
    counts = {"tokens": 0, "documents": 0, "bytes": 0, "replaced": 0}
    replaced_in = ""
    mask_file = None  # opened at the first chunk with weights
    loss_tokens = 0
    with open(tmp / TOKENS_FILE, "wb") as raw, contextlib.ExitStack() as later:
        f = HashingWriter(raw)
        for enc in _encode_all(tok, _jobs(plan, bar), workers):
            if enc.mask is not None and mask_file is None:
                mask_file = HashingWriter(later.enter_context(open(tmp / MASK_FILE, "wb")))
                _write_ones(mask_file, counts["tokens"])  # the plain documents before it
                loss_tokens = counts["tokens"]
            if mask_file is not None:
                if enc.mask is None:
                    _write_ones(mask_file, enc.tokens.size)
                    loss_tokens += enc.tokens.size
                else:
                    mask_file.write(enc.mask.tobytes())
                    loss_tokens += int(enc.mask.sum(dtype=np.int64))
            f.write(enc.tokens.astype(tok.dtype, copy=False).tobytes())
            counts["tokens"] += enc.tokens.size
            counts["documents"] += enc.documents
            counts["bytes"] += enc.nbytes
            counts["replaced"] += enc.replaced
            replaced_in = replaced_in or enc.replaced_in
            bar.update(enc.nbytes if plan.kind != "tfds" else enc.documents)
        for out in filter(None, (f, mask_file)):
            out.f.flush()
            os.fsync(out.f.fileno())
    return {
        # Always written: the key says this build looked for prompt/completion records.
        "mask": MASK_FILE if mask_file is not None else None,
        **counts,
        "loss_tokens": loss_tokens if mask_file is not None else counts["tokens"],
        "replaced_first_in": replaced_in or None,
        "sha256": f.hexdigest(),
        **({"mask_sha256": mask_file.hexdigest()} if mask_file is not None else {}),
    }


def _manifest(plan: _Plan, written: dict, seconds: float) -> dict:
    tok = plan.tokenizer
    return {
        "format": CACHE_FORMAT,
        "digest": plan.digest(),
        "source": plan.source,
        "split": plan.split,
        "tfds_split": plan.tfds_split or None,
        "tokenizer": tok.spec(),
        "dtype": tok.dtype.name,
        "file": TOKENS_FILE,
        **written,
        "files": len(plan.units) if plan.kind != "tfds" else None,
        "build_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _report(plan: _Plan, manifest: dict, final: Path) -> None:
    """What a build made, on stderr, and a warning if it replaced undecodable bytes."""
    name, secs = plan.tokenizer.name, manifest["build_seconds"]
    print(
        f"token cache: {manifest['tokens']:,} {name} tokens from {manifest['documents']:,} "
        f"documents of {plan.source} ({plan.split}) in {secs:.1f}s -> {final}"
        + (f" ({manifest['loss_tokens']:,} count in the loss)" if manifest["mask"] else ""),
        file=sys.stderr,
    )
    if manifest["replaced"]:
        print(
            f"warning: {manifest['replaced']:,} undecodable byte sequences in {plan.source} "
            f"({plan.split}) were replaced with U+FFFD (first in {manifest['replaced_first_in']})",
            file=sys.stderr,
        )


def _write_ones(f: Any, n: int) -> None:
    block = np.ones(min(n, 1 << 20), np.uint8).tobytes()
    while n > 0:
        f.write(block[:n])
        n -= len(block)


def ensure_cache(cfg: Config, split: str) -> tuple[dict, Path, bool]:
    """Builds `split`'s token cache unless a matching one exists.

    Returns:
        (its manifest, its directory, whether it was built now).
    """
    plan = _plan(cfg, split, get_tokenizer(cfg.data.tokenizer))
    final = Path(cfg.data.cache_dir).expanduser() / plan.dir_name()
    manifest = _read_manifest(final)
    if _manifest_matches(manifest, plan):
        return manifest, final, False
    try:
        if final.exists():
            print(f"token cache {final} is stale or incomplete; rebuilding", file=sys.stderr)
            shutil.rmtree(final)
        return _build(plan, final, num_workers(cfg)), final, True
    except OSError as e:  # a full disk, a directory made read-only, ...: one line, not a trace
        raise DataError(f"could not build the token cache {final}: {e}") from None
