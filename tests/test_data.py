"""Data pipeline: sources, token cache, sliding windows, order, process slices, resume, eval.

Small file corpora written to tmp dirs; the stdlib source only for its deterministic listing.
"""

import gzip
import json
import os
import random
import signal
import string
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gptjax import data
from gptjax.bench.data import bench_data
from gptjax.config import config_from_dict
from gptjax.data import (
    DataError,
    TrainIterator,
    cache,
    encode,
    eval_batches,
    load_tokens,
    shards,
    sources,
)
from gptjax.data.store import Store
from gptjax.tokenizer import get_tokenizer
from helpers import InterruptAt, needs_bpe, process_env

T = 16


def make_cfg(tmp_path, source, *, context=T, **data_kw):
    data_cfg = {"source": str(source), "cache_dir": str(tmp_path / "cache"), "prefetch": 2}
    data_cfg.update(data_kw)
    model = {"vocab_size": 257, "context_length": context, "local_window": min(8, context)}
    if data_cfg.get("tokenizer") == "gpt2":
        model["vocab_size"] = 50257
    return config_from_dict({"model": model, "data": data_cfg})


def write_corpus(root: Path, n_files=30, chars=400, seed=0) -> Path:
    """Random-letter documents: every window of T+1 tokens is unique, so rows locate themselves."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = "".join(rng.choice(string.ascii_letters + " \n") for _ in range(chars + i))
        (root / f"doc{i:03d}.txt").write_text(text)
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def take(it, n):
    return [next(it) for _ in range(n)]


def window_index(tokens, stride):
    """{window contents: start} for every window of the stream."""
    n = data.num_windows(len(tokens), T, stride)
    arr = np.asarray(tokens)
    return {arr[s * stride : s * stride + T + 1].tobytes(): s * stride for s in range(n)}


def starts_of(batches, index):
    out = []
    for b in batches:
        full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).astype(np.uint16)
        for row in full:
            out.append(index[row.tobytes()])  # KeyError: not an exact slice of the stream
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# Windows, order, processes


@pytest.mark.slow
def test_tf_data_loads_without_keras() -> None:
    """TensorFlow's import loads Keras's optimizers (1.4 s of each training start) unless
    import_tf hides them: tf.data works, and neither Keras nor torch is loaded (nor left hidden)."""
    code = ("import sys; from gptjax.data.sources import import_tf; tf = import_tf(); "
            "assert list(tf.data.Dataset.range(3).as_numpy_iterator()) == [0, 1, 2]; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'keras', 'torch'}))")
    r = subprocess.run([sys.executable, "-c", code], env=process_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["[]"], r.stderr[-2000:]


def test_windows_are_shifted_exact_slices_and_cover_the_epoch(tmp_path, corpus):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    tokens = load_tokens(cfg, "train")
    assert tokens.dtype == np.uint16
    index = window_index(tokens, T)
    n = len(index)
    assert n == data.num_windows(len(tokens), T, T) and n > 20
    with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
        batches = take(it, -(-n // 4) + 2)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (4, T)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert b["mask"].dtype == np.float32 and (b["mask"] == 1).all()
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    starts = starts_of(batches, index)
    # Every window exactly once in the first epoch: each token (but the tail) is an input once.
    assert sorted(starts[:n]) == list(range(0, n * T, T))
    assert starts[:n] != sorted(starts[:n])  # shuffled
    assert starts[n:] != starts[: len(starts) - n]  # the next epoch has another order


def test_overlapping_windows_with_smaller_stride(tmp_path, corpus):
    stride = 4
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, stride=stride)
    tokens = load_tokens(cfg, "train")
    index = window_index(tokens, stride)
    n = len(index)
    assert n == (len(tokens) - T - 1) // stride + 1
    with TrainIterator(cfg, 8, process_index=0, process_count=1) as it:
        batches = take(it, -(-n // 8))
    starts = starts_of(batches, index)[:n]
    assert sorted(starts) == list(range(0, n * stride, stride))


def test_seeded_order(tmp_path, corpus):
    def first(seed, n=6):
        cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, seed=seed)
        with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
            return np.concatenate([b["inputs"] for b in take(it, n)])

    a = first(0)
    np.testing.assert_array_equal(a, first(0))
    assert not np.array_equal(a, first(1))


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 5, 16, 17, 1000, 4097):
        idx = np.arange(n)
        p = data.permute(idx, n, seed=3, epoch=1)
        assert sorted(p.tolist()) == list(range(n))
    n = 1000
    a = data.permute(np.arange(n), n, 0, 0)
    assert not np.array_equal(a, data.permute(np.arange(n), n, 1, 0))
    assert not np.array_equal(a, data.permute(np.arange(n), n, 0, 1))
    # Per-element epochs (a batch straddling two epochs) agree with whole-epoch calls.
    mixed = data.permute(np.array([5, 7]), n, 0, np.array([0, 1]))
    assert mixed.tolist() == [a[5], data.permute(np.array([7]), n, 0, 1)[0]]


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_are_disjoint_and_cover_the_global_batch(tmp_path, corpus, count):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    with TrainIterator(cfg, 8, process_index=0, process_count=1) as it:
        whole = take(it, 5)
    parts = []
    for p in range(count):
        with TrainIterator(cfg, 8, process_index=p, process_count=count) as it:
            assert it.local_batch_size == 8 // count
            parts.append(take(it, 5))
            state = it.get_state()
        assert state == TrainIterator(cfg, 8, process_index=0, process_count=1).get_state() | {
            "index": state["index"]
        }
    for b in range(5):
        for key in ("inputs", "targets", "mask"):
            joined = np.concatenate([parts[p][b][key] for p in range(count)])
            np.testing.assert_array_equal(joined, whole[b][key])
    with pytest.raises(DataError, match="multiple of the 3 processes"):
        TrainIterator(cfg, 8, process_index=0, process_count=3)


def test_restore_mid_epoch_and_across_epoch_boundary(tmp_path, corpus):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, seed=7)
    with TrainIterator(cfg, 4) as it:
        n = it.windows
        per_epoch = n // 4
        ref = take(it, per_epoch + 6)
    # Resume at a mid-epoch batch, and at one whose next batches cross into epoch 1.
    for k in (3, per_epoch - 2):
        it = TrainIterator(cfg, 4)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # a checkpoint stores it as JSON
        assert set(state) >= {"seed", "epoch", "index"}
        it.close()
        resumed = TrainIterator(cfg, 4, state=state)
        for want in ref[k : k + 6]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        resumed.close()
    assert TrainIterator(cfg, 4, state=state).get_state()["epoch"] == 0
    # The state is the position after the batches returned, not what tf.data prefetched.
    it = TrainIterator(cfg, 4)
    take(it, per_epoch + 1)
    assert it.get_state()["epoch"] == 1
    assert it.get_state()["index"] == (per_epoch + 1) * 4 - n
    it.close()


def test_restore_with_another_batch_size_continues_the_stream(tmp_path, corpus):
    # The trainer's batch-size ramp: a new iterator with a new batch size from the old state.
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    with TrainIterator(cfg, 2) as it:
        rows = np.concatenate([b["inputs"] for b in take(it, 6)])
    with TrainIterator(cfg, 2) as small:
        first = np.concatenate([b["inputs"] for b in take(small, 2)])
        with TrainIterator(cfg, 4, state=small.get_state()) as big:
            rest = np.concatenate([b["inputs"] for b in take(big, 2)])
    np.testing.assert_array_equal(np.concatenate([first, rest]), rows)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_thread_pipeline_yields_the_tf_data_batches(tmp_path, corpus, prefetch):
    """data.pipeline=threads: the same batches as tf.data, in order, from any resumed state, and
    its threads end when the iterator closes."""
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, seed=3, pipeline="tf.data")
    threads = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, seed=3,
                       pipeline="threads", prefetch=prefetch)
    with TrainIterator(cfg, 4) as it:
        n = it.windows
        want = take(it, n // 4 + 3)  # into the second epoch
    with TrainIterator(threads, 4) as it:
        got = take(it, 5)
        state = it.get_state()
    with TrainIterator(threads, 4, state=state) as it:
        got += take(it, len(want) - 5)
        assert it.get_state() == {**state, "epoch": 1, "index": len(want) * 4 - n}
    for w, g in zip(want, got, strict=True):
        assert set(g) == set(w)
        for key in w:
            assert g[key].dtype == w[key].dtype
            np.testing.assert_array_equal(g[key], w[key])
    for _ in range(50):  # shutdown(wait=False): the running ones finish their batch
        if not [t for t in threading.enumerate() if t.name.startswith("gptjax-batches")]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the pipeline's threads outlive its iterator")


def test_bad_states(tmp_path, corpus):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    state = TrainIterator(cfg, 4).get_state()
    with pytest.raises(DataError, match="tokenizer gpt2"):
        TrainIterator(cfg, 4, state=state | {"tokenizer": "gpt2"})
    with pytest.raises(DataError, match="windows"):
        TrainIterator(cfg, 4, state=state | {"windows": state["windows"] + 1})
    with pytest.raises(DataError, match="not a data iterator state"):
        TrainIterator(cfg, 4, state={"step": 3})


# ---------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("count", [1, 2])
def test_eval_every_window_once_in_order(tmp_path, corpus, count):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.3, stride=4)
    tokens = np.asarray(load_tokens(cfg, "validation"))
    n = data.num_windows(len(tokens), T, T)  # eval windows never overlap, whatever the stride
    size = 6 if n % 6 else 4
    assert n % size  # so the last batch is padded
    per_process = [
        list(eval_batches(cfg, size, process_index=p, process_count=count)) for p in range(count)
    ]
    assert len({len(b) for b in per_process}) == 1  # all processes run the same number of steps
    assert len(per_process[0]) == -(-n // size)
    rows = []
    for b in range(len(per_process[0])):
        for p in range(count):
            batch = per_process[p][b]
            assert batch["inputs"].shape == (size // count, T)
            np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
            for i, m in enumerate(batch["mask"]):
                rows.append((batch["inputs"][i], batch["targets"][i], m))
    for w, (inputs, targets, mask) in enumerate(rows):
        if w < n:
            assert (mask == 1).all()
            np.testing.assert_array_equal(inputs, tokens[w * T : w * T + T])
            np.testing.assert_array_equal(targets, tokens[w * T + 1 : w * T + T + 1])
        else:
            assert (mask == 0).all() and not inputs.any()


# ---------------------------------------------------------------------------------------------
# Sources and the cache


def test_files_jsonl_gzip_and_documents_joined_by_eot(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    with gzip.open(src / "b.txt.gz", "wt") as f:
        f.write("beta")
    lines = [json.dumps({"body": f"line {i}", "id": i}) for i in range(40)]
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n\n")
    (src / "empty.txt").write_text("")
    cfg = make_cfg(
        tmp_path, f"{src}/*.txt,{src}/*.txt.gz,{src}/*.jsonl.gz", text_key="body", val_fraction=0.25
    )
    tok = get_tokenizer("byte")
    train = tok.decode(load_tokens(cfg, "train")).split("<|endoftext|>")
    val = tok.decode(load_tokens(cfg, "validation")).split("<|endoftext|>")
    assert train[-1] == val[-1] == ""  # every document ends with EOT
    docs = train[:-1] + val[:-1]
    assert sorted(docs) == sorted(["alpha", "beta"] + [f"line {i}" for i in range(40)])
    assert len(val) > 1 and len(train) > 1  # both splits got documents
    # Order follows the sorted file list, then line order.
    lines_in_train = [d for d in train if d.startswith("line")]
    assert lines_in_train == sorted(lines_in_train, key=lambda d: int(d.split()[1]))


def test_undecodable_bytes_are_replaced_counted_and_reported(tmp_path, capsys):
    src = write_corpus(tmp_path / "src", n_files=3)
    (src / "bad.txt").write_bytes(b"ok \xff\xfe then \xc3 end \xef\xbf\xbd")  # last: a real U+FFFD
    cfg = make_cfg(tmp_path, f"{src}/*.txt", val_fraction=0.0001)
    manifest, _, built = data.ensure_cache(cfg, "train")
    assert built and manifest["replaced"] == 3 and manifest["replaced_first_in"] == "bad.txt"
    err = capsys.readouterr().err
    assert "3 undecodable byte sequences" in err and "bad.txt" in err
    text = get_tokenizer("byte").decode(load_tokens(cfg, "train"))
    assert "ok \ufffd\ufffd then \ufffd end \ufffd" in text


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path, corpus, capsys):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    m1, path, built = data.ensure_cache(cfg, "train")
    assert built and (path / "manifest.json").exists()
    assert m1["tokenizer"]["name"] == "byte" and m1["dtype"] == "uint16"
    assert m1["tokens"] == len(load_tokens(cfg, "train"))
    _, path2, built = data.ensure_cache(cfg, "train")
    assert not built and path2 == path
    # A changed file gives another cache.
    (corpus / "doc000.txt").write_text("changed " * 40)
    _, path3, built = data.ensure_cache(cfg, "train")
    if path3 != path:
        assert built
    # A manifest that does not match (here: another tokenizer's) is not trusted.
    manifest = json.loads((path3 / "manifest.json").read_text())
    manifest["tokenizer"]["name"] = "gpt2"
    (path3 / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    m4, path4, built = data.ensure_cache(cfg, "train")
    assert built and path4 == path3 and m4["tokenizer"]["name"] == "byte"
    assert "rebuilding" in capsys.readouterr().err
    # So is a token file of the wrong size.
    with open(path4 / m4["shards"][0]["file"], "ab") as f:
        f.write(b"\0\0")
    assert data.ensure_cache(cfg, "train")[2]


@needs_bpe
def test_cache_of_another_tokenizer_is_not_used(tmp_path, corpus):
    byte_cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    gpt2_cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, tokenizer="gpt2")
    byte_tokens = load_tokens(byte_cfg, "train")
    gpt2_tokens = load_tokens(gpt2_cfg, "train")
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.decode(gpt2_tokens) == get_tokenizer("byte").decode(byte_tokens)
    assert len(gpt2_tokens) < len(byte_tokens)
    # A model too small for the tokenizer's ids is caught before training.
    small = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, tokenizer="gpt2")
    small = small.__class__(**{**small.__dict__, "model": byte_cfg.model})
    with pytest.raises(DataError, match="model.vocab_size=257") as e:
        TrainIterator(small, 4)
    one_line(e)


def _cache_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name.endswith(".bin")}


def interrupted_build(cfg, monkeypatch, n: int) -> InterruptAt:
    """A build of jobs of 1000 bytes, 2 to a shard, stopped by Ctrl-C at job n; the counter of
    its jobs, disarmed, so the next build runs to its end."""
    monkeypatch.setattr(encode, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(shards, "SHARD_JOBS", 2)
    jobs = InterruptAt(monkeypatch, encode, "_encode_files", n)
    with pytest.raises(KeyboardInterrupt):
        load_tokens(cfg, "train")
    jobs.armed = False
    return jobs


def test_interrupted_build_resumes_from_its_finished_shards(tmp_path, corpus, monkeypatch):
    """Ctrl-C mid-build keeps the finished shards (and no half-written file); the next build
    tokenizes only what is left and gives the cache an uninterrupted build gives."""
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    jobs = interrupted_build(cfg, monkeypatch, 6)
    [partial] = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    left = sorted(p.name for p in partial.iterdir())
    assert left == ["shard.00000.json", "shard.00001.json", "tokens.00000.bin",
                    "tokens.00001.bin"]  # no manifest, no temporary file
    jobs.calls = 0
    manifest, path, built = data.ensure_cache(cfg, "train")
    assert built and path == partial and manifest["resumed_shards"] == 2
    resumed_jobs = jobs.calls
    assert manifest["shards"][-1]["file"] == f"tokens.{len(manifest['shards']) - 1:05d}.bin"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["manifest.json", "verified.json", *(s["file"] for s in manifest["shards"])])
    # An uninterrupted build elsewhere: the same files and checksums, and 4 more jobs.
    jobs.calls = 0
    whole, whole_path, _ = data.ensure_cache(make_cfg(tmp_path / "b", f"{corpus}/*.txt",
                                                      val_fraction=0.2), "train")
    assert jobs.calls == resumed_jobs + 4
    assert whole["sha256"] == manifest["sha256"] and whole["shards"] == manifest["shards"]
    assert _cache_files(whole_path) == _cache_files(path)


def test_resume_with_other_job_sizes_starts_over(tmp_path, corpus, monkeypatch):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    interrupted_build(cfg, monkeypatch, 4)
    monkeypatch.setattr(encode, "CHUNK_BYTES", 3000)
    manifest, path, built = data.ensure_cache(cfg, "train")
    assert built and manifest["resumed_shards"] == 0
    assert not [p for p in path.iterdir() if p.name.startswith("shard.")]
    np.testing.assert_array_equal(
        load_tokens(cfg, "train"),
        load_tokens(make_cfg(tmp_path / "b", f"{corpus}/*.txt", val_fraction=0.2), "train"))


@pytest.mark.slow
def test_killed_build_resumes(tmp_path, corpus):
    """A build killed with SIGKILL leaves its finished shards, and temporary files that the next
    build removes before it resumes."""
    cache_dir = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import time
        from gptjax import data
        from gptjax.config import config_from_dict
        from gptjax.data import encode, shards
        cfg = config_from_dict({{"model": {{"vocab_size": 257, "context_length": {T},
            "local_window": 8}}, "data": {{"source": "{corpus}/*.txt",
            "cache_dir": "{cache_dir}", "val_fraction": 0.2}}}})
        encode.CHUNK_BYTES = 1000
        shards.SHARD_JOBS = 2
        real = encode._encode_files
        def slow(*args):
            print("chunk", flush=True)
            time.sleep(0.2)
            return real(*args)
        encode._encode_files = slow
        data.load_tokens(cfg, "train")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(6):
            assert proc.stdout.readline() == "chunk\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    [partial] = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    names = [p.name for p in partial.iterdir()]
    assert "manifest.json" not in names and "shard.00001.json" in names
    assert any(n.endswith(".tmp") for n in names)  # the shard it was writing
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    encode_chunk, shard_jobs = encode.CHUNK_BYTES, shards.SHARD_JOBS
    encode.CHUNK_BYTES, shards.SHARD_JOBS = 1000, 2
    try:
        manifest, path, built = data.ensure_cache(cfg, "train")
    finally:
        encode.CHUNK_BYTES, shards.SHARD_JOBS = encode_chunk, shard_jobs
    assert built and manifest["resumed_shards"] >= 2
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    whole = data.ensure_cache(make_cfg(tmp_path / "b", f"{corpus}/*.txt", val_fraction=0.2),
                              "train")[0]
    np.testing.assert_array_equal(load_tokens(cfg, "train"),
                                  load_tokens(make_cfg(tmp_path / "b", f"{corpus}/*.txt",
                                                       val_fraction=0.2), "train"))
    assert whole["tokens"] == manifest["tokens"]


@pytest.mark.slow
def test_concurrent_builds_of_one_cache(tmp_path, corpus):
    """Two processes (two hosts' processes on one filesystem) building the same cache at once."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from gptjax import data
        from gptjax.config import config_from_dict
        from gptjax.data import encode
        cfg = config_from_dict({{"model": {{"vocab_size": 257, "context_length": {T},
            "local_window": 8}}, "data": {{"source": "{corpus}/*.txt",
            "cache_dir": "{tmp_path}/cache", "val_fraction": 0.2}}}})
        encode.CHUNK_BYTES = 500
        print(int(np.asarray(data.load_tokens(cfg, "train")).sum()))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    assert outs[0] == outs[1] == f"{int(np.asarray(load_tokens(cfg, 'train')).sum())}\n"
    name = data.ensure_cache(cfg, "train")[1].name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{name}.lock", name]


def test_a_second_builder_waits_for_the_first_and_uses_its_cache(tmp_path, corpus, capsys):
    """The build lock: a process that finds another one building waits, then reads its cache."""
    import fcntl

    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    plan = cache.make_plan(cfg, "train", get_tokenizer("byte"))
    lock = tmp_path / "cache" / f".{plan.dir_name()}.lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another builder holds it

    def other_builder() -> None:  # builds while holding the lock, then lets go
        time.sleep(0.5)
        shards.build(plan, Store(tmp_path / "cache").sub(plan.dir_name()), 1)
        os.close(fd)

    builder = threading.Thread(target=other_builder)
    builder.start()
    manifest, path, built = data.ensure_cache(cfg, "train")
    builder.join()
    assert not built and manifest["tokens"] > 0
    assert "waiting for the process building it" in capsys.readouterr().err


@needs_bpe
def test_parallel_build_equals_sequential(tmp_path, corpus, monkeypatch):
    seq = make_cfg(tmp_path / "a", f"{corpus}/*.txt", val_fraction=0.2, tokenizer="gpt2")
    par = make_cfg(
        tmp_path / "b", f"{corpus}/*.txt", val_fraction=0.2, tokenizer="gpt2", num_workers=2
    )
    expected = np.asarray(load_tokens(seq, "train"))
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(encode, "CHUNK_BYTES", 2000)
    used = []
    real = shards._encode_all

    def spy(tok, jobs, workers):
        used.append(workers)
        return real(tok, jobs, workers)

    monkeypatch.setattr(shards, "_encode_all", spy)
    np.testing.assert_array_equal(load_tokens(par, "train"), expected)
    assert used == [2]


def test_stdlib_files_are_listed_deterministically():
    files = data.stdlib_files()
    assert files == data.stdlib_files()
    keys = [k for k, _ in files]
    assert keys == sorted(keys) and len(keys) > 500
    assert "os.py" in keys and "json/__init__.py" in keys
    assert not any("site-packages" in k for k in keys)
    val = [k for k in keys if sources.in_validation(k, 0.01)]
    assert 0.002 < len(val) / len(keys) < 0.03  # about 1%
    assert val == [k for k in keys if sources.in_validation(k, 0.01)]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_sources(tmp_path, corpus):
    for source, pattern in [
        ("wikipedia", "unknown data.source='wikipedia'"),
        (f"{tmp_path}/nothing/*.txt", "matches no files"),
        ("tfds:Bad-Name", "not of the form"),
    ]:
        with pytest.raises(DataError, match=pattern) as e:
            load_tokens(make_cfg(tmp_path, source), "train")
        one_line(e)
    with pytest.raises(DataError, match="val_fraction=0") as e:
        load_tokens(make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.0), "validation")
    one_line(e)
    with pytest.raises(DataError, match="validation split .* is empty") as e:
        load_tokens(make_cfg(tmp_path, f"{corpus}/doc001.txt", val_fraction=1e-9), "validation")
    one_line(e)


def test_fewer_tokens_than_one_window(tmp_path):
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "a.txt").write_text("short")
    (src / "b.txt").write_text("short too")
    cfg = make_cfg(tmp_path, f"{src}/*.txt", val_fraction=0.5)
    with pytest.raises(DataError, match="fewer than one window") as e:
        TrainIterator(cfg, 2)
    one_line(e)
    with pytest.raises(DataError, match="fewer than one window|is empty"):
        eval_batches(cfg, 2)


@pytest.mark.slow
def test_import_without_tensorflow(tmp_path, corpus):
    """Without TF: `import gptjax.data`, file caches and training batches (data.pipeline=auto
    takes threads) work; asking for tf.data is one clear line."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow"] = None  # makes `import tensorflow` fail
        sys.modules["tensorflow_datasets"] = None
        from gptjax import data
        from gptjax.config import config_from_dict
        cfg = config_from_dict({{"model": {{"vocab_size": 257, "context_length": {T},
            "local_window": 8}}, "data": {{"source": "{corpus}/*.txt",
            "cache_dir": "{tmp_path}/cache", "val_fraction": 0.2}}}})
        assert len(data.load_tokens(cfg, "train")) > 0
        assert next(data.eval_batches(cfg, 2, process_index=0, process_count=1))["mask"].any()
        assert next(data.TrainIterator(cfg, 2, process_index=0, process_count=1))["mask"].all()
        cfg = config_from_dict({{"model": {{"vocab_size": 257, "context_length": {T},
            "local_window": 8}}, "data": {{"source": "{corpus}/*.txt",
            "cache_dir": "{tmp_path}/cache", "val_fraction": 0.2, "pipeline": "tf.data"}}}})
        try:
            next(data.TrainIterator(cfg, 2, process_index=0, process_count=1))
        except data.DataError as e:
            print("DataError:", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "DataError: tensorflow is needed" in out.stdout


# ---------------------------------------------------------------------------------------------
# TFDS, offline


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny text dataset prepared locally in TFDS format (what `tfds build` would leave)."""
    tf = sources.import_tf()
    import tensorflow_datasets as tfds

    root = tmp_path_factory.mktemp("tfds")
    rng = random.Random(1)

    def docs(n):
        return [
            "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(60)) for _ in range(n)
        ]

    train, val = docs(12), docs(4)
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_text",
        version="1.0.0",
        features=tfds.features.FeaturesDict({"content": tfds.features.Text()}),
        split_datasets={
            "train": tf.data.Dataset.from_tensor_slices({"content": train}),
            "dev": tf.data.Dataset.from_tensor_slices({"content": val}),
        },
        data_dir=str(root),
        disable_shuffling=True,
    )
    return root, train, val



def test_tfds_source_offline(tmp_path, tfds_dir, no_network):
    root, train, val = tfds_dir
    cfg = make_cfg(
        tmp_path,
        "tfds:tiny_text:1.0.0",
        tfds_data_dir=str(root),
        text_key="content",
        val_split="dev",
    )
    tok = get_tokenizer("byte")
    assert tok.decode(load_tokens(cfg, "train")) == "".join(d + "<|endoftext|>" for d in train)
    assert tok.decode(load_tokens(cfg, "validation")) == "".join(d + "<|endoftext|>" for d in val)
    manifest = data.ensure_cache(cfg, "train")[0]
    assert manifest["source"] == "tfds:tiny_text:1.0.0" and manifest["documents"] == 12
    with TrainIterator(cfg, 2) as it:
        assert next(it)["inputs"].shape == (2, T)
    assert len(list(eval_batches(cfg, 2))) >= 1
    # The newest prepared version is used when none is named.
    cfg = make_cfg(tmp_path, "tfds:tiny_text", tfds_data_dir=str(root), text_key="content")
    assert len(load_tokens(cfg, "train")) > 0


def test_tfds_bad_input_fails_fast_offline(tmp_path, tfds_dir, no_network):
    root, _, _ = tfds_dir
    cases = [
        ("tfds:tiny_shakespeare", {}, "not prepared under .* never downloaded"),
        ("tfds:no_such_dataset_xyz", {}, "unknown TFDS dataset 'no_such_dataset_xyz'"),
        ("tfds:tiny_text:2.0.0", {}, "prepared: 1.0.0"),
        ("tfds:tiny_text", {"text_key": "text"}, "data.text_key='text'.*content"),
        ("tfds:tiny_text", {"text_key": "content"}, "data.val_split='validation'.*dev, train"),
    ]
    for source, kw, pattern in cases:
        cfg = make_cfg(tmp_path, source, tfds_data_dir=str(root), **kw)
        split = "train" if "text_key" in pattern else "validation"
        start = time.perf_counter()
        with pytest.raises(DataError, match=pattern) as e:
            load_tokens(cfg, split)
        assert time.perf_counter() - start < 10
        one_line(e)


def test_benchmark_smoke(tmp_path, corpus):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    out = bench_data(cfg, seq=32, batch=2, seconds=0.2, text_mb=0.05, workers=1)
    assert out["byte_mb_per_s"] > 0 and out["tokens_per_s"] > 0 and out["batches"] > 0
    assert out["pipeline"] == "tf.data" and set(out["pipelines"]) == {"tf.data", "threads"}
    assert all(r["tokens_per_s"] > 0 for r in out["pipelines"].values())
    assert out["cache_build_s"] is not None
    json.dumps(out)


def test_a_dead_worker_is_one_line_and_keeps_the_finished_shards(tmp_path, corpus, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    monkeypatch.setattr(encode, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(shards, "SHARD_JOBS", 2)
    real, calls = shards._encode_all, []

    def dies(tok, jobs, workers):  # as the pool reports a worker killed by the OOM killer
        for enc in real(tok, jobs, workers):
            calls.append(1)
            if len(calls) == 5:
                raise BrokenProcessPool("A process in the process pool was terminated")
            yield enc

    monkeypatch.setattr(shards, "_encode_all", dies)
    with pytest.raises(DataError, match="try fewer data.num_workers") as e:
        load_tokens(cfg, "train")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(shards, "_encode_all", real)
    assert data.ensure_cache(cfg, "train")[0]["resumed_shards"] == 2
