"""Input-pipeline speed: tokenizers (MB/s) and training batches read from the token cache."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import time
from typing import Any

from gptjax.config import Config
from gptjax.data.batches import TrainIterator, pipeline_kind
from gptjax.data.cache import ensure_cache, num_workers
from gptjax.data.encode import CHUNK_BYTES, decode_utf8, encode_texts, init_worker, run_in_worker
from gptjax.data.sources import stdlib_files
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer, get_tokenizer


def _stdlib_text(megabytes: float) -> list[str]:
    """About `megabytes` of standard-library source, as documents, for tokenizer speed."""
    texts, size = [], 0
    for _, path in stdlib_files():
        if size >= megabytes * 1e6:
            break
        text, _ = decode_utf8(path.read_bytes())
        texts.append(text)
        size += len(text.encode())
    return texts


def _tokenize_rate(tok: Tokenizer, texts: list[str], workers: int = 1) -> float:
    nbytes = sum(len(t.encode()) for t in texts)
    if workers <= 1:
        start = time.perf_counter()
        for t in texts:
            tok.encode_array(t)
        return nbytes / (time.perf_counter() - start) / 1e6
    chunks, chunk, size = [], [], 0
    for t in texts:
        chunk.append(t.encode())
        size += len(chunk[-1])
        if size >= CHUNK_BYTES // 4:
            chunks.append(chunk)
            chunk, size = [], 0
    chunks.append(chunk)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker, initargs=(tok,)
    ) as pool:
        # Warm the workers (imports, ranks) before timing.
        list(pool.map(run_in_worker, [encode_texts] * workers, [([""], [b"warm"])] * workers))
        start = time.perf_counter()
        list(pool.map(run_in_worker, [encode_texts] * len(chunks), [(c, c) for c in chunks]))
        return nbytes / (time.perf_counter() - start) / 1e6


def bench_data(
    cfg: Config | None = None,
    *,
    seq: int = 2048,
    batch: int = 8,
    seconds: float = 5.0,
    text_mb: float = 8.0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Input-pipeline speed.

    Args:
        cfg: supplies the data section (source, tokenizer, cache_dir); default `Config()`, i.e.
            the stdlib source with the byte tokenizer in `.cache/gptjax/tokens`.
        seq: context length T of the timed training batches.
        batch: sequences per timed batch (one process).
        seconds: how long to time batches from the cache.
        text_mb: megabytes of stdlib source used to time the tokenizers.
        workers: processes for the parallel gpt2 figure; default one per core.

    Returns:
        A flat dict: tokenizer MB/s (byte; gpt2 on one core and on `workers` cores, None without
        the ranks file), the cache's size and build time (None when it was reused) and training
        batches from it in tokens/s: by `pipelines` (tf.data where TensorFlow is installed, and
        threads), and at the top level for the one data.pipeline picks.
    """
    cfg = cfg or Config()
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, context_length=seq, vocab_size=max(cfg.model.vocab_size, 50257)
        ),
        data=dataclasses.replace(cfg.data, stride=0),
    )
    workers = workers or num_workers(cfg)
    texts = _stdlib_text(text_mb)
    out: dict[str, Any] = {"text_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2)}
    out["byte_mb_per_s"] = round(_tokenize_rate(get_tokenizer("byte"), texts), 1)
    try:
        gpt2 = get_tokenizer("gpt2")
    except UserError as e:
        out["gpt2_mb_per_s"] = out["gpt2_mb_per_s_parallel"] = None
        out["gpt2_missing"] = str(e)
    else:
        out["gpt2_mb_per_s"] = round(_tokenize_rate(gpt2, texts), 2)
        out["gpt2_mb_per_s_parallel"] = None
        if workers > 1:
            out["gpt2_mb_per_s_parallel"] = round(_tokenize_rate(gpt2, texts, workers), 2)
            out["workers"] = workers

    start = time.perf_counter()
    manifest, _, built = ensure_cache(cfg, "train")
    out["cache"] = f"{cfg.data.source} ({cfg.data.tokenizer})"
    out["cache_tokens"] = manifest["tokens"]
    out["cache_build_s"] = round(time.perf_counter() - start, 2) if built else None

    out.update(seq=seq, batch=batch, pipeline=pipeline_kind(cfg.data.pipeline), pipelines={})
    kinds = ["tf.data", "threads"] if pipeline_kind("auto") == "tf.data" else ["threads"]
    for kind in kinds:  # each available pipeline, the same batches: which keeps up better
        kind_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pipeline=kind))
        out["pipelines"][kind] = _batch_rate(kind_cfg, batch, seconds)
    out.update(out["pipelines"][out["pipeline"]])
    return out


def _batch_rate(cfg: Config, batch: int, seconds: float) -> dict[str, Any]:
    it = TrainIterator(cfg, batch, process_index=0, process_count=1)
    for _ in range(20):  # warm up: threads started, pages in cache
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - start
    it.close()
    T = cfg.model.context_length
    return {"batches": n, "batches_per_s": round(n / elapsed, 1),
            "tokens_per_s": round(n * batch * T / elapsed)}
