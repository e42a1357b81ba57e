"""Building a split's token cache in shards, so that an interrupted build resumes.

The plan's documents are cut into jobs of about CHUNK_BYTES of text (encode.py), tokenized in
order by a pool of processes, and every SHARD_JOBS consecutive jobs make one shard: a token file,
a loss-weight file when the shard has prompt/completion records, and a small JSON record with
their checksums, written after them. The jobs of a plan are the same on every run, so a build that
finds the records of shards 0..k-1 skips their jobs and starts at shard k; the manifest, written
last, lists every shard and is what makes the cache complete.

Memory stays bounded whatever the corpus size: each process holds one job (its text, the tokens,
and for Parquet at most one row group beyond CHUNK_BYTES), this process at most two finished jobs
per worker, and a shard is streamed to its file (to a URL, the finished shard is sent whole).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptjax.data import encode
from gptjax.data.encode import Encoded, Job, file_jobs, init_worker, run_in_worker, text_jobs
from gptjax.data.integrity import HashingWriter, stamp_built
from gptjax.data.plan import CACHE_FORMAT, Plan
from gptjax.data.sources import DataError, tfds_documents
from gptjax.data.store import Store

MANIFEST_FILE = "manifest.json"
# Jobs per shard: with encode.CHUNK_BYTES of text each, shards of about 64 MB of text.
SHARD_JOBS = 16
# Below this much text (and for the byte tokenizer, which is faster than the pickling a process
# pool adds) tokenization stays in this process: starting workers would cost more than it saves.
PARALLEL_MIN_BYTES = 32 << 20


class BuildStopped(DataError):
    """A build that stopped for a reason outside its source (a worker killed): unlike a source
    that cannot be read, its finished shards are kept for the next build to resume after."""


def tokens_name(i: int) -> str:
    return f"tokens.{i:05d}.bin"


def mask_name(i: int) -> str:
    """Loss weights, one uint8 per token (the weight of predicting that token); only in shards
    with prompt/completion records: a shard of plain text weighs every token 1 and stores none."""
    return f"mask.{i:05d}.bin"


def record_name(i: int) -> str:
    return f"shard.{i:05d}.json"


# ---------------------------------------------------------------------------------------------
# Tokenizer processes


def _encode_all(tok: Any, jobs: Iterable[Job], workers: int) -> Iterator[Encoded]:
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


def _jobs(plan: Plan, progress: Any) -> Iterator[Job]:
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
# Shards


def sizes_ok(store: Store, shards: list[dict], itemsize: int) -> bool:
    """Whether each shard's files are the sizes its record says (where the store can tell)."""
    return all(
        store.size(s["file"]) in (None, s["tokens"] * itemsize)
        and (not s["mask"] or store.size(s["mask"]) in (None, s["tokens"]))
        for s in shards
    )


def finished_shards(plan: Plan, store: Store) -> list[dict]:
    """The records of the shards 0..k-1 an earlier build of this plan finished, in order: each
    one's files present (at their recorded size, where the store can tell) and made with the
    job sizes of this build."""
    names = set(store.names())
    itemsize = plan.tokenizer.dtype.itemsize
    records: list[dict] = []
    for i in itertools.count():
        raw = store.read_bytes(record_name(i)) if record_name(i) in names else None
        try:
            rec = json.loads(raw) if raw is not None else None
            ok = rec is not None and (
                rec["index"] == i
                and rec["digest"] == plan.digest()
                and rec["shard_jobs"] == SHARD_JOBS
                and rec["chunk_bytes"] == encode.CHUNK_BYTES
                and rec["job_rule"] == encode.JOB_RULE
                and sizes_ok(store, [rec], itemsize)
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return records
        records.append(rec)
    return records


class _Progress:
    """A bar over the source's bytes (TFDS: documents) with the token rate beside it."""

    def __init__(self, plan: Plan, done: list[dict]) -> None:
        self.files = plan.kind != "tfds"
        self.bar = tqdm(
            total=sum(u.size for u in plan.units) if self.files else None,
            initial=sum(r["source_bytes" if self.files else "documents"] for r in done),
            unit="B" if self.files else " docs",
            unit_scale=True,
            desc=f"tokenizing {plan.source} ({plan.split}, {plan.tokenizer.name})",
            file=sys.stderr,
            mininterval=0.5,
            leave=False,
        )
        self.tokens = 0
        self.start = time.perf_counter()

    def advance(self, enc: Encoded) -> None:
        self.tokens += enc.tokens.size
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e3:,.0f}k tok/s", refresh=False)
        self.bar.update(enc.source_bytes if self.files else enc.documents)

    def close(self) -> None:
        self.bar.close()


def _write_shard(
    plan: Plan, store: Store, staging: Path, i: int, encoded: Iterable[Encoded], bar: _Progress
) -> dict | None:
    """Streams the chunks of shard i to temporary files, moves them into the store, then writes
    the shard's record; None when there was no chunk left (the build is done)."""
    tok = plan.tokenizer
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp_tokens = staging / f".{tokens_name(i)}.{tag}.tmp"
    tmp_mask = staging / f".{mask_name(i)}.{tag}.tmp"
    rec: dict[str, Any] = {"index": i, "tokens": 0, "documents": 0, "bytes": 0, "replaced": 0,
                           "replaced_in": "", "source_bytes": 0, "loss_tokens": 0}
    jobs = 0
    try:
        with open(tmp_tokens, "wb") as raw, contextlib.ExitStack() as later:
            f, mask = HashingWriter(raw), None  # the mask is opened at the first weighted chunk
            for enc in encoded:
                jobs += 1
                if enc.mask is not None and mask is None:
                    mask = HashingWriter(later.enter_context(open(tmp_mask, "wb")))
                    _write_ones(mask, rec["tokens"])  # the plain documents before it
                if mask is not None:
                    mask.write(enc.mask.tobytes() if enc.mask is not None
                               else np.ones(enc.tokens.size, np.uint8).tobytes())
                rec["loss_tokens"] += (enc.tokens.size if enc.mask is None
                                       else int(enc.mask.sum(dtype=np.int64)))
                f.write(enc.tokens.astype(tok.dtype, copy=False).tobytes())
                for key in ("documents", "replaced", "source_bytes"):
                    rec[key] += getattr(enc, key)
                rec["tokens"] += enc.tokens.size
                rec["bytes"] += enc.nbytes
                rec["replaced_in"] = rec["replaced_in"] or enc.replaced_in
                bar.advance(enc)
            if jobs == 0:
                return None
            for out in filter(None, (f, mask)):
                out.f.flush()
                os.fsync(out.f.fileno())
        store.put(tokens_name(i), tmp_tokens)
        if mask is not None:
            store.put(mask_name(i), tmp_mask)
    finally:
        for tmp in (tmp_tokens, tmp_mask):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    rec.update(
        digest=plan.digest(), shard_jobs=SHARD_JOBS, chunk_bytes=encode.CHUNK_BYTES,
        job_rule=encode.JOB_RULE, file=tokens_name(i), sha256=f.hexdigest(),
        mask=mask_name(i) if mask is not None else None,
        mask_sha256=mask.hexdigest() if mask is not None else None,
    )
    store.write_bytes(record_name(i), json.dumps(rec).encode())
    return rec


def _write_ones(f: Any, n: int) -> None:
    block = np.ones(min(n, 1 << 20), np.uint8).tobytes()
    while n > 0:
        f.write(block[:n])
        n -= len(block)


def _remove_leftovers(store: Store, keep: set[str]) -> None:
    """Deletes the files of the directory that the manifest does not list: shard records,
    shards of an earlier build past the last one, temporary files of a killed build."""
    for name in store.names():
        if name not in keep:
            store.remove(name)


# ---------------------------------------------------------------------------------------------
# A whole build


def build(plan: Plan, store: Store, workers: int) -> dict:
    """Builds (or finishes building) the plan's cache in `store`; returns its manifest."""
    start = time.perf_counter()
    if plan.tokenizer.name == "byte" or plan.approx_bytes < PARALLEL_MIN_BYTES:
        workers = 1  # byte tokenization outruns the pickling a process pool adds
    done = finished_shards(plan, store)
    resumed = len(done)
    if resumed:
        print(f"token cache {store}: resuming after {resumed} finished shard(s)", file=sys.stderr)
    _remove_leftovers(store, {*_data_files(done), *(record_name(r["index"]) for r in done)})
    bar = _Progress(plan, done)
    try:
        with store.staging() as staging:
            jobs = itertools.islice(_jobs(plan, bar.bar), resumed * SHARD_JOBS, None)
            # Closed on any exit, so a worker pool never outlives a failed build.
            with contextlib.closing(_encode_all(plan.tokenizer, jobs, workers)) as chunks:
                while rec := _write_shard(plan, store, staging, len(done),
                                          itertools.islice(chunks, SHARD_JOBS), bar):
                    done.append(rec)
    except BrokenProcessPool:
        raise BuildStopped(
            f"a tokenizer process of the {plan.split} split of {plan.source} died (out of "
            "memory?); try fewer data.num_workers. The finished shards are kept: the next "
            "build resumes after them") from None
    finally:
        bar.close()
    manifest = _manifest(plan, done, time.perf_counter() - start, resumed)
    store.write_bytes(MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    _remove_leftovers(store, {MANIFEST_FILE, *_data_files(manifest["shards"])})
    if not store.remote:
        stamp_built(Path(store.root), manifest)  # so the first load need not hash what was written
    _report(plan, manifest, store)
    return manifest


def _data_files(shards: list[dict]) -> list[str]:
    return [n for s in shards for n in (s["file"], s["mask"]) if n]


def _manifest(plan: Plan, shards: list[dict], seconds: float, resumed: int) -> dict:
    tok = plan.tokenizer
    listed = [{k: s[k] for k in ("file", "tokens", "sha256", "mask", "mask_sha256")}
              for s in shards]
    return {
        "format": CACHE_FORMAT,
        "digest": plan.digest(),
        "source": plan.source,
        "split": plan.split,
        "tfds_split": plan.tfds_split or None,
        "tokenizer": tok.spec(),
        "dtype": tok.dtype.name,
        **{k: sum(s[k] for s in shards)
           for k in ("tokens", "documents", "bytes", "replaced", "loss_tokens")},
        "replaced_first_in": next((s["replaced_in"] for s in shards if s["replaced_in"]), None),
        # Whether any shard has loss weights (the source has prompt/completion records).
        "mask": any(s["mask"] for s in shards),
        "shards": listed,
        # One checksum of the whole cache: of its shards' checksums, in order.
        "sha256": hashlib.sha256(
            "".join(f"{s['sha256']} {s['mask_sha256'] or '-'}\n" for s in listed).encode()
        ).hexdigest(),
        "files": len(plan.units) if plan.kind != "tfds" else None,
        "shard_jobs": SHARD_JOBS,
        "chunk_bytes": encode.CHUNK_BYTES,
        "resumed_shards": resumed,
        # What this build tokenized itself (the resumed shards' tokens were made before).
        "built_tokens": sum(s["tokens"] for s in shards[resumed:]),
        "build_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _report(plan: Plan, manifest: dict, store: Store) -> None:
    """What a build made, on stderr, and a warning if it replaced undecodable bytes."""
    name, secs = plan.tokenizer.name, manifest["build_seconds"]
    print(
        f"token cache: {manifest['tokens']:,} {name} tokens from {manifest['documents']:,} "
        f"documents of {plan.source} ({plan.split}) in {len(manifest['shards'])} shard(s), "
        f"{secs:.1f}s -> {store}"
        + (f" ({manifest['loss_tokens']:,} count in the loss)" if manifest["mask"] else ""),
        file=sys.stderr,
    )
    if manifest["replaced"]:
        print(
            f"warning: {manifest['replaced']:,} undecodable byte sequences in {plan.source} "
            f"({plan.split}) were replaced with U+FFFD (first in {manifest['replaced_first_in']})",
            file=sys.stderr,
        )
