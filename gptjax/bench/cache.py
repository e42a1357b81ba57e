"""`python -m gptjax.bench cache`: building the token cache of a generated Parquet corpus with
`python -m gptjax.data build`, as a user runs it: tokens per second (and per core), and the peak
resident memory of the whole process tree (the build and its tokenizer workers, sampled), then the
same build killed halfway and resumed, whose cache must equal the uninterrupted one's.

The corpus is FineWeb-shaped (an `id` and a `text` column, row groups of 1000 documents,
several files) with the Python standard library's source as its text, each file a document, and
the set repeated (each copy marked) until the corpus is as large as asked.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptjax.data import stdlib_files

ROWS_PER_GROUP = 1000
FILE_BYTES = 256 << 20  # text per Parquet file


def _documents() -> Iterator[tuple[str, str]]:
    """(id, text) forever: the standard library's files, each copy of the set marked."""
    texts = [p.read_text(errors="replace") for _, p in stdlib_files()]
    for copy in itertools.count():
        for i, t in enumerate(texts):
            yield f"<urn:copy:{copy}:{i}>", f"# copy {copy}\n{t}"


def write_corpus(directory: Path, gb: float) -> dict[str, Any]:
    """Parquet files of at least `gb` GB on disk (snappy, pyarrow's default); returns sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    docs = _documents()
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    want, on_disk, text_bytes, rows, f = gb * 1e9, 0, 0, 0, 0
    ratio = 3.0  # text bytes per byte on disk, until a file has measured it
    while on_disk < want:
        path = directory / f"part-{f:04d}.parquet"
        target = min(FILE_BYTES, (want - on_disk) * ratio)
        written = 0
        with pq.ParquetWriter(path, schema) as w:
            while written < target:
                ids, texts = zip(*itertools.islice(docs, ROWS_PER_GROUP))
                w.write_table(pa.table({"id": list(ids), "text": list(texts)}, schema=schema))
                written += sum(len(t) for t in texts)
                rows += len(texts)
        size = path.stat().st_size
        text_bytes, on_disk, f = text_bytes + written, on_disk + size, f + 1
        ratio = text_bytes / on_disk
    return {"files": f, "bytes_on_disk": on_disk, "text_bytes": text_bytes, "rows": rows}


def _tree(pid: int) -> list[Any]:
    """A process and its descendants (none when it has exited)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(pid: int) -> tuple[int, int]:
    """(summed RSS of a process and its descendants, the largest one's), in bytes."""
    import psutil

    sizes = []
    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited since it was listed
            sizes.append(p.memory_info().rss)
    return sum(sizes), max(sizes, default=0)


def _build(corpus: Path, cache_dir: Path, tokenizer: str, workers: int,
           kill_after_shards: int = 0) -> dict[str, Any]:
    """Runs the build command, sampling the memory of its process tree every 50 ms; with
    kill_after_shards, SIGKILLs it once that many shards are finished."""
    cmd = [sys.executable, "-m", "gptjax.data", "build", "--split", "train", "--json",
           f"data.source={corpus}/*.parquet", f"data.tokenizer={tokenizer}",
           f"data.cache_dir={cache_dir}", f"data.num_workers={workers}", "data.val_fraction=0"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_total = peak_one = 0
    killed = False
    while proc.poll() is None:
        total, one = _tree_rss(proc.pid)
        peak_total, peak_one = max(peak_total, total), max(peak_one, one)
        if kill_after_shards and len(list(cache_dir.glob("*/shard.*.json"))) >= kill_after_shards:
            _kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.05)
    out = proc.communicate()[0]
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": round(seconds, 2), "peak_rss_mib": peak_total >> 20,
                              "peak_rss_one_process_mib": peak_one >> 20, "killed": killed}
    if not killed:
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
        result["manifest"] = json.loads(out.splitlines()[-1])
    return result


def _kill_tree(pid: int) -> None:
    import psutil

    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def bench_cache(workdir: Path, gb: float, tokenizers: list[str], workers: int,
                resume: bool = True) -> dict[str, Any]:
    """Corpus written once under `workdir` (kept for reruns), then per tokenizer a full build,
    and with `resume` a build killed at half its shards and finished."""
    corpus = workdir / f"parquet-{gb:g}gb"
    marker = corpus / "corpus.json"
    if marker.exists():
        info = json.loads(marker.read_text())
    else:
        t = time.perf_counter()
        info = write_corpus(corpus, gb)
        info["write_seconds"] = round(time.perf_counter() - t, 1)
        marker.write_text(json.dumps(info))
    out: dict[str, Any] = {"corpus": info, "workers": workers, "builds": []}
    for tok in tokenizers:
        cache = workdir / f"cache-{gb:g}gb-{tok}"
        subprocess.run(["rm", "-rf", str(cache), str(cache) + "-resumed"], check=True)
        full = _build(corpus, cache, tok, workers)
        m = full.pop("manifest")
        # The byte tokenizer runs in the build's own process (it outruns a pool's pickling).
        cores = 1 if tok == "byte" else workers
        row = {"tokenizer": tok, "cores": cores, "tokens": m["tokens"],
               "shards": len(m["shards"]), **full,
               "tokens_per_s": round(m["tokens"] / full["seconds"]),
               "tokens_per_s_per_core": round(m["tokens"] / full["seconds"] / cores),
               "text_mb_per_s": round(info["text_bytes"] / 1e6 / full["seconds"], 1)}
        if resume:
            half = max(1, len(m["shards"]) // 2)
            killed = _build(corpus, Path(str(cache) + "-resumed"), tok, workers, half)
            if not killed["killed"]:
                raise RuntimeError("the build to be killed at half its shards finished first")
            rest = _build(corpus, Path(str(cache) + "-resumed"), tok, workers)
            r = rest.pop("manifest")
            row["resume"] = {"killed_after_s": killed["seconds"], "killed": killed["killed"],
                             "resumed_shards": r["resumed_shards"],
                             "finish_seconds": rest["seconds"],
                             "peak_rss_mib": max(killed["peak_rss_mib"], rest["peak_rss_mib"]),
                             "sha256_equal": r["sha256"] == m["sha256"],
                             "shards_equal": r["shards"] == m["shards"]}
        subprocess.run(["rm", "-rf", str(cache), str(cache) + "-resumed"], check=True)
        out["builds"].append(row)
    return out
