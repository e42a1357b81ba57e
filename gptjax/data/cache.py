"""Sources → token cache → tf.data sliding windows → global jax.Array batches.

GPT-3 trains on windows slid over one long token stream: documents are packed, each followed by
the end-of-text id, and nothing is masked across them. A source is tokenized once into a cache
directory (one token file per split plus a JSON manifest); training windows are then read from a
memory map in a seeded pseudo-random order that needs no buffer, so the iterator's position is
three numbers and a resumed run sees exactly the batches an uninterrupted one would.

Fine-tuning data comes as `.jsonl` records with `prompt` and `completion` strings: each becomes
the document prompt + completion + end-of-text, and a parallel uint8 loss-weight file (0 on prompt
tokens, 1 elsewhere) is cached next to the tokens, so the loss counts completion tokens only.

TensorFlow and JAX are imported inside the functions that need them: `import gptjax.data` (and
the tokenizer worker processes) stay light, and file sources build their cache without TF.
"""

from __future__ import annotations

import atexit
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
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import Config
from gptjax.data.sources import (
    DataError,
    Doc,
    FileUnit,
    file_documents,
    glob_units,
    import_tf,
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
JSONL_RULE = 1
# Work is handed to tokenizer processes in chunks of about this much text.
CHUNK_BYTES = 4 << 20
# Below this much text (and for the byte tokenizer, which is faster than the pickling a process
# pool adds) tokenization stays in this process: spawning workers costs seconds.
PARALLEL_MIN_BYTES = 32 << 20


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
        return any(u.jsonl for u in self.units)

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
    keep = [u for u in units if u.jsonl or in_validation(u.key, d.val_fraction) == want_val]
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
# Tokenization (these functions also run in worker processes)


@dataclasses.dataclass
class _Encoded:
    tokens: np.ndarray
    # uint8 loss weights, one per token; None when the chunk held no prompt/completion record.
    mask: np.ndarray | None = None
    documents: int = 0
    nbytes: int = 0
    replaced: int = 0
    replaced_in: str = ""  # the first document with undecodable bytes


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text with undecodable bytes replaced by U+FFFD, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


def _join(tok: Tokenizer, docs: Iterable[Doc]) -> _Encoded:
    """Tokenizes documents, each followed by the end-of-text id; a prompt/completion document
    also gets loss weights: 0 on the prompt, 1 on the completion and its end-of-text."""
    parts, out = [], _Encoded(np.zeros(0, tok.dtype))
    runs: list[int] = []  # alternating lengths of weight-0 and weight-1 runs
    completions = False
    eot = np.array([tok.eot_id], dtype=tok.dtype)
    for name, data, completion in docs:
        pieces = [data] if completion is None else [data, completion]
        texts = []
        for piece in pieces:
            out.nbytes += len(piece)
            text, bad = _decode(piece)
            if bad:
                out.replaced += bad
                out.replaced_in = out.replaced_in or name
            texts.append(text)
        if not any(texts):
            continue
        # Prompt and completion are encoded apart, as a sampler encodes the prompt alone: the
        # boundary is exact, and the model learns the completion's tokens as it will meet them.
        ids = [tok.encode_array(t).astype(tok.dtype, copy=False) for t in texts]
        parts += [*ids, eot]
        prompt = len(ids[0]) if completion is not None else 0
        runs += [prompt, sum(len(i) for i in ids) + 1 - prompt]
        completions = completions or completion is not None
        out.documents += 1
    if parts:
        out.tokens = np.concatenate(parts)
    if completions:
        out.mask = np.repeat(np.tile(np.array([0, 1], np.uint8), len(runs) // 2), runs)
    return out


def _encode_files(
    tok: Tokenizer, units: tuple[FileUnit, ...], split: str, val_fraction: float, text_key: str
) -> _Encoded:
    return _join(tok, file_documents(units, split, val_fraction, text_key))


def _encode_texts(tok: Tokenizer, names: list[str], texts: list[bytes]) -> _Encoded:
    return _join(tok, ((name, text, None) for name, text in zip(names, texts)))


_WORKER_TOKENIZER: Tokenizer | None = None


def _worker_init(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _in_worker(fn: Callable[..., _Encoded], args: tuple) -> _Encoded:
    return fn(_WORKER_TOKENIZER, *args)


def num_workers(cfg: Config) -> int:
    """Tokenizer processes: `data.num_workers`, or one per usable core when it is 0."""
    if cfg.data.num_workers:
        return cfg.data.num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _encode_all(
    tok: Tokenizer,
    jobs: Iterable[tuple[Callable[..., _Encoded], tuple]],
    workers: int,
) -> Iterator[_Encoded]:
    """Runs the jobs in order, in `workers` spawned processes when workers > 1. At most two jobs
    per worker are in flight, so a huge source never queues up in memory."""
    if workers <= 1:
        for fn, args in jobs:
            yield fn(tok, *args)
        return
    # spawn, not fork: the parent usually has JAX's and TF's threads running.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(tok,)
    ) as pool:
        pending: collections.deque = collections.deque()
        try:
            for fn, args in jobs:
                pending.append(pool.submit(_in_worker, fn, args))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _file_jobs(plan: _Plan) -> Iterator[tuple[Callable[..., _Encoded], tuple]]:
    chunk: list[FileUnit] = []
    size = 0
    for u in plan.units:
        chunk.append(u)
        size += u.size
        if size >= CHUNK_BYTES:
            yield _encode_files, (tuple(chunk), plan.split, plan.val_fraction, plan.text_key)
            chunk, size = [], 0
    if chunk:
        yield _encode_files, (tuple(chunk), plan.split, plan.val_fraction, plan.text_key)


def _tfds_jobs(plan: _Plan, progress: Any) -> Iterator[tuple[Callable[..., _Encoded], tuple]]:
    docs = tfds_documents(
        plan.tfds_dir,
        plan.tfds_split,
        plan.text_key,
        source=plan.source,
        split=plan.split,
        progress=progress,
    )
    names: list[str] = []
    texts: list[bytes] = []
    size = 0
    for name, text in docs:
        names.append(name)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            yield _encode_texts, (names, texts)
            names, texts, size = [], [], 0
    if texts:
        yield _encode_texts, (names, texts)


# ---------------------------------------------------------------------------------------------
# The token cache


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
    from tqdm import tqdm

    cache_dir = final.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(cache_dir, final.name)
    tag = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = cache_dir / f".tmp.{final.name}.{tag}"
    tmp.mkdir()
    tok = plan.tokenizer
    start = time.perf_counter()
    total_bytes = sum(u.size for u in plan.units)
    if tok.name == "byte" or plan.approx_bytes < PARALLEL_MIN_BYTES:
        workers = 1  # byte tokenization outruns the pickling a process pool adds
    sha = hashlib.sha256()
    counts = {"tokens": 0, "documents": 0, "bytes": 0, "replaced": 0}
    replaced_in = ""
    mask_file = None  # opened at the first chunk with weights
    loss_tokens = 0
    try:
        bar = tqdm(
            total=total_bytes if plan.kind != "tfds" else None,
            unit="B" if plan.kind != "tfds" else " docs",
            unit_scale=True,
            desc=f"tokenizing {plan.source} ({plan.split}, {tok.name})",
            file=sys.stderr,
            mininterval=0.5,
            leave=False,
        )
        with bar, open(tmp / TOKENS_FILE, "wb") as f, contextlib.ExitStack() as later:
            jobs = _tfds_jobs(plan, bar) if plan.kind == "tfds" else _file_jobs(plan)
            for enc in _encode_all(tok, jobs, workers):
                if enc.mask is not None and mask_file is None:
                    mask_file = later.enter_context(open(tmp / MASK_FILE, "wb"))
                    _write_ones(mask_file, counts["tokens"])  # the plain documents before it
                    loss_tokens = counts["tokens"]
                if mask_file is not None:
                    if enc.mask is None:
                        _write_ones(mask_file, enc.tokens.size)
                        loss_tokens += enc.tokens.size
                    else:
                        mask_file.write(enc.mask.tobytes())
                        loss_tokens += int(enc.mask.sum(dtype=np.int64))
                data = enc.tokens.astype(tok.dtype, copy=False).tobytes()
                f.write(data)
                sha.update(data)
                counts["tokens"] += enc.tokens.size
                counts["documents"] += enc.documents
                counts["bytes"] += enc.nbytes
                counts["replaced"] += enc.replaced
                replaced_in = replaced_in or enc.replaced_in
                bar.update(enc.nbytes if plan.kind != "tfds" else enc.documents)
            for out in filter(None, (f, mask_file)):
                out.flush()
                os.fsync(out.fileno())
        manifest = {
            "format": CACHE_FORMAT,
            "digest": plan.digest(),
            "source": plan.source,
            "split": plan.split,
            "tfds_split": plan.tfds_split or None,
            "tokenizer": tok.spec(),
            "dtype": tok.dtype.name,
            "file": TOKENS_FILE,
            # Always written: the key says this build looked for prompt/completion records.
            "mask": MASK_FILE if mask_file is not None else None,
            **counts,
            "loss_tokens": loss_tokens if mask_file is not None else counts["tokens"],
            "replaced_first_in": replaced_in or None,
            "sha256": sha.hexdigest(),
            "files": len(plan.units) if plan.kind != "tfds" else None,
            "build_seconds": round(time.perf_counter() - start, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
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
    secs = manifest["build_seconds"]
    print(
        f"token cache: {manifest['tokens']:,} {tok.name} tokens from {manifest['documents']:,} "
        f"documents of {plan.source} ({plan.split}) in {secs:.1f}s -> {final}"
        + (f" ({manifest['loss_tokens']:,} count in the loss)" if manifest["mask"] else ""),
        file=sys.stderr,
    )
    if manifest["replaced"]:
        print(
            f"warning: {manifest['replaced']:,} undecodable byte sequences in {plan.source} "
            f"({plan.split}) were replaced with U+FFFD (first in {replaced_in})",
            file=sys.stderr,
        )
    return manifest


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
    if final.exists():
        print(f"token cache {final} is stale or incomplete; rebuilding", file=sys.stderr)
        shutil.rmtree(final)
    return _build(plan, final, num_workers(cfg)), final, True


def load_tokens(cfg: Config, split: str) -> np.ndarray:
    """The token stream of `split` ("train" or "validation"): documents joined by end-of-text.

    Builds the cache under `cfg.data.cache_dir` on first use and reuses it while the source,
    tokenizer and split rules are unchanged.

    Returns:
        A read-only uint16 (vocab ≤ 65536) or uint32 memory map.

    Raises:
        DataError: unknown source, a glob matching nothing, an unprepared or unknown TFDS dataset,
            an empty split, ...
    """
    return load_split(cfg, split)[0]


def load_mask(cfg: Config, split: str) -> np.ndarray | None:
    """The loss weights of `split`'s tokens, parallel to `load_tokens`: a read-only uint8 memory
    map (0 on prompt tokens of prompt/completion records, 1 elsewhere), or None when every weight
    is 1 (no such record). Position i weighs the prediction of token i, i.e. a target."""
    return load_split(cfg, split)[1]


def load_split(cfg: Config, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(`load_tokens`, `load_mask`) of `split` from one look at the cache."""
    manifest, path, _ = ensure_cache(cfg, split)
    if manifest["tokens"] == 0:
        rule = (
            f" (data.val_fraction={cfg.data.val_fraction} selected no document)"
            if split == "validation" and not cfg.data.source.startswith("tfds:")
            else ""
        )
        raise DataError(f"the {split} split of data.source={cfg.data.source!r} is empty{rule}")
    n = manifest["tokens"]
    tokens = np.memmap(path / manifest["file"], dtype=manifest["dtype"], mode="r", shape=(n,))
    mask = None
    if manifest.get("mask"):
        mask = np.memmap(path / manifest["mask"], dtype=np.uint8, mode="r", shape=(n,))
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Windows and their order


def num_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """How many windows of context_length + 1 tokens, `stride` apart, fit in n_tokens."""
    span = context_length + 1
    return 0 if n_tokens < span else (n_tokens - span) // stride + 1


_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit avalanche mix (splitmix64's finalizer) of a uint64 array."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: np.ndarray | int) -> np.ndarray:
    """The image of `index` under a pseudo-random bijection of [0, n) keyed by (seed, epoch).

    A 4-round Feistel network on the smallest even-width bit domain that holds n; values that land
    outside [0, n) are mapped again until they fall inside ("cycle walking"), which keeps it a
    bijection. Unlike a stored permutation it costs no memory, whatever the dataset size, and
    position k of any epoch is computed directly.
    """
    index = np.asarray(index, dtype=np.int64)
    if n <= 0:
        raise ValueError("n must be positive")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"index out of range [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    epoch = np.broadcast_to(np.asarray(epoch, dtype=np.uint64), index.shape)
    base = _mix64(np.full(index.shape, seed & _MASK64, dtype=np.uint64) ^ np.uint64(0x5EED))
    base = _mix64(base ^ _mix64(epoch + np.uint64(0x9E3779B97F4A7C15)))
    keys = [_mix64(base + np.uint64(r + 1)) for r in range(4)]
    x = index.astype(np.uint64)
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> shift, y & mask
        for key in keys:
            k = key[todo]
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def _check_processes(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise DataError(
            f"batch size {batch_size} is not a positive multiple of the {process_count} processes"
        )
    return process_index, process_count, batch_size // process_count


def _check_vocab(cfg: Config, split: str, tokens: np.ndarray) -> int:
    """Checks the model can embed the tokenizer's ids and the split holds a window; the stride."""
    tok = get_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer={tok.name} has {tok.vocab_size} ids but model.vocab_size="
            f"{cfg.model.vocab_size}"
        )
    T = cfg.model.context_length
    if len(tokens) < T + 1:
        raise DataError(
            f"the {split} split of data.source={cfg.data.source!r} has {len(tokens)} tokens, "
            f"fewer than one window of model.context_length + 1 = {T + 1}"
        )
    return cfg.data.stride or T


def _rows(tokens: np.ndarray, starts: np.ndarray, span: int, dtype: Any = np.int32) -> np.ndarray:
    """[len(starts), span] of `dtype`: contiguous slices of the memory map, one read each."""
    out = np.empty((len(starts), span), dtype=dtype)
    for i, s in enumerate(starts):
        out[i] = tokens[s : s + span]
    return out


def _window_mask(mask: np.ndarray | None, starts: np.ndarray, T: int) -> np.ndarray:
    """float32 [len(starts), T]: the weights of the targets of the windows at `starts`, i.e. of
    tokens start + 1 ... start + T (all ones without a mask)."""
    if mask is None:
        return np.ones((len(starts), T), np.float32)
    return _rows(mask, np.asarray(starts) + 1, T, np.float32)


# Live pipelines, closed before interpreter shutdown: tf.data threads still calling
# numpy_function while Python finalizes can deadlock the exit (seen in 1 run of 3).
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for it in list(_LIVE):
        it.close()


class TrainIterator:
    """Training batches of windows in a seeded order, this process's rows of each global batch.

    Epoch e visits every window once, in the order `permute(·, windows, seed, e)`; global batch b
    takes the next `batch_size` positions of the endless sequence of epochs (a batch may straddle
    two epochs), and process p takes rows [p·L, (p+1)·L) of it, L = batch_size // process_count.
    The position is therefore the same small state on every process.

    Yields:
        {"inputs": int32 [L, T], "targets": int32 [L, T] (inputs shifted by one),
         "mask": float32 [L, T] (the targets' loss weights: 0 on prompt tokens of
         prompt/completion records, 1 elsewhere)}
    """

    def __init__(
        self,
        cfg: Config,
        batch_size: int,
        *,
        state: dict | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count, self.local_batch_size = _check_processes(
            batch_size, process_index, process_count
        )
        self.batch_size = batch_size
        self.tokens, self.mask = load_split(cfg, "train")
        self.stride = _check_vocab(cfg, "train", self.tokens)
        self.context_length = cfg.model.context_length
        self.tokenizer = cfg.data.tokenizer
        self.windows = num_windows(len(self.tokens), self.context_length, self.stride)
        self.seed = cfg.data.seed
        self.prefetch = cfg.data.prefetch
        self._position = 0  # of the next window, counted over all epochs
        if state is not None:
            self._restore(state)
        self._it: Iterator | None = None

    def _restore(self, state: dict) -> None:
        try:
            seed, epoch, index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"not a data iterator state: {state!r}") from None
        if state.get("tokenizer", self.tokenizer) != self.tokenizer:
            raise DataError(
                f"the data state was saved with tokenizer {state['tokenizer']} but "
                f"data.tokenizer={self.tokenizer}"
            )
        if state.get("windows", self.windows) != self.windows:
            raise DataError(
                f"the data state was saved over {state['windows']} windows but the data now has "
                f"{self.windows} (source, tokenizer, context_length or stride changed)"
            )
        if epoch < 0 or not 0 <= index < self.windows:
            raise DataError(f"data state out of range: {state!r}")
        # The state's seed wins over the config's: it is what makes the resumed order exact.
        self.seed = seed
        self._position = epoch * self.windows + index

    def get_state(self) -> dict:
        """Where the next batch starts: JSON-able, identical on every process."""
        epoch, index = divmod(self._position, self.windows)
        return {
            "seed": self.seed,
            "epoch": epoch,
            "index": index,
            "windows": self.windows,
            "tokenizer": self.tokenizer,
        }

    def _batch_fn(self) -> Callable[[np.int64], tuple[np.ndarray, np.ndarray]]:
        # Plain locals, so tf.data's threads hold no reference to the iterator itself.
        tokens, mask, n, seed, stride = self.tokens, self.mask, self.windows, self.seed, self.stride
        start = self._position + self.process_index * self.local_batch_size
        step, T = self.batch_size, self.context_length
        offsets = np.arange(self.local_batch_size, dtype=np.int64)

        def rows(b: np.int64) -> tuple[np.ndarray, np.ndarray]:
            epoch, index = np.divmod(start + int(b) * step + offsets, n)
            starts = permute(index, n, seed, epoch) * stride
            return _rows(tokens, starts, T + 1), _window_mask(mask, starts, T)

        return rows

    def _make(self) -> Iterator:
        tf = import_tf()
        rows = self._batch_fn()
        L, T = self.local_batch_size, self.context_length

        def load(b: Any) -> dict:
            x, m = tf.numpy_function(rows, [b], (tf.int32, tf.float32), stateful=False)
            x.set_shape([L, T + 1])
            m.set_shape([L, T])
            return {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": m}

        ds = tf.data.Dataset.range(1 << 62).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        if self.prefetch:
            ds = ds.prefetch(self.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).as_numpy_iterator()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make()
            _LIVE.add(self)
        batch = next(self._it)
        self._position += self.batch_size
        return batch

    def close(self) -> None:
        """Stops the tf.data pipeline; the iterator can go on (it restarts where it was)."""
        self._it = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_batches(
    cfg: Config,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every validation window once, in order, this process's rows of each global batch.

    Validation windows never overlap (stride = context_length, whatever data.stride), so each
    token is scored once. Every process yields the same number of batches; rows past the last
    window are zeros with mask 0. Within a window the mask is the targets' loss weights, as in
    `TrainIterator`.

    Yields:
        {"inputs", "targets": int32 [L, T], "mask": float32 [L, T]}, L = batch_size // processes.
    """
    index, _, local = _check_processes(batch_size, process_index, process_count)
    tokens, mask = load_split(cfg, "validation")
    _check_vocab(cfg, "validation", tokens)
    T = cfg.model.context_length
    n = num_windows(len(tokens), T, T)
    return _eval_iter(tokens, mask, n, T, batch_size, index * local, local)


def _eval_iter(
    tokens: np.ndarray,
    weights: np.ndarray | None,
    n: int,
    T: int,
    batch_size: int,
    first: int,
    local: int,
) -> Iterator[dict[str, np.ndarray]]:
    offsets = np.arange(local, dtype=np.int64)
    for b in range(-(-n // batch_size)):
        windows = b * batch_size + first + offsets
        valid = windows < n
        starts = windows[valid] * T
        x = _rows(tokens, starts, T + 1)
        inputs = np.zeros((local, T), np.int32)
        targets = np.zeros((local, T), np.int32)
        mask = np.zeros((local, T), np.float32)
        inputs[valid], targets[valid] = x[:, :-1], x[:, 1:]
        mask[valid] = _window_mask(weights, starts, T)
        yield {"inputs": inputs, "targets": targets, "mask": mask}

