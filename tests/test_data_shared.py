"""One token cache for every process: a cache_dir that is a URL (read by ranged requests through
tensorstore, as gs:// is; here file://, the same code path on a local disk) or a local directory
shared through its build lock. Two processes of one jax.distributed run build it once and read
the same batches as one process."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gptjax import data
from gptjax.config import config_from_dict
from gptjax.data import encode, shards, store
from helpers import InterruptAt

T = 16


def make_cfg(cache_dir: str, corpus: Path) -> object:
    return config_from_dict({
        "model": {"vocab_size": 257, "context_length": T, "local_window": 8},
        "data": {"source": f"{corpus}/*.jsonl", "cache_dir": cache_dir, "val_fraction": 0.2,
                 "pipeline": "threads"},
    })


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for f in range(3):
        with open(root / f"part{f}.jsonl", "w") as out:
            for i in range(60):
                words = rng.choice(["alpha", "beta", "gamma", "delta", "eps"], 20 + i % 7)
                out.write(json.dumps({"id": f"{f}-{i}", "text": " ".join(words)}) + "\n")
    return root


def batches(cfg, n: int = 4, batch: int = 4, **kw) -> list[np.ndarray]:
    with data.TrainIterator(cfg, batch, **kw) as it:
        return [next(it)["inputs"] for _ in range(n)]


def test_url_cache_reads_ranges_and_equals_a_local_cache(corpus, tmp_path, monkeypatch):
    # Small jobs and shards: windows cross shard boundaries.
    monkeypatch.setattr(encode, "CHUNK_BYTES", 2000)
    monkeypatch.setattr(shards, "SHARD_JOBS", 1)
    local = make_cfg(str(tmp_path / "local"), corpus)
    url = make_cfg(f"file://{tmp_path}/remote", corpus)
    m_local, _, _ = data.ensure_cache(local, "train")
    m_url, where, built = data.ensure_cache(url, "train")
    assert built and isinstance(where, str) and where.startswith("file://")
    assert len(m_url["shards"]) > 3 and m_url["sha256"] == m_local["sha256"]
    requested, calls = [], []
    real = store.read_ranges

    def spy(requests):
        requested.extend(hi - lo for _, lo, hi in requests)
        calls.append(len({id(f) for f, _, _ in requests}))
        return real(requests)

    monkeypatch.setattr(store, "read_ranges", spy)
    kw = {"process_index": 0, "process_count": 1}
    for a, b in zip(batches(local, **kw), batches(url, **kw)):
        np.testing.assert_array_equal(a, b)
    # Only the windows' tokens were read (and those of the batches prefetched): a range per
    # window, two where it crosses shards.
    assert requested and max(requested) <= T + 1 and sum(requested) % (T + 1) == 0
    assert max(calls) > 1  # one batch of requests spans several shards
    for a, b in zip(data.eval_batches(local, 4, **kw), data.eval_batches(url, 4, **kw)):
        np.testing.assert_array_equal(a["targets"], b["targets"])
    np.testing.assert_array_equal(data.load_tokens(url, "train"),
                                  data.load_tokens(local, "train"))


def test_url_cache_waits_for_process_0_and_resumes(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(encode, "CHUNK_BYTES", 2000)
    monkeypatch.setattr(shards, "SHARD_JOBS", 1)
    url = make_cfg(f"file://{tmp_path}/remote", corpus)
    # The files are larger than a job: streamed here and cut into jobs of documents.
    jobs = InterruptAt(monkeypatch, encode, "_encode_docs", 3)
    with pytest.raises(KeyboardInterrupt):
        data.ensure_cache(url, "train")
    jobs.armed = False
    manifest, _, built = data.ensure_cache(url, "train")
    assert built and manifest["resumed_shards"] == 2
    assert manifest["sha256"] == data.ensure_cache(make_cfg(str(tmp_path / "l"), corpus),
                                                   "train")[0]["sha256"]
    # Process 1 never builds a URL cache: it waits for the manifest process 0 writes.
    monkeypatch.setattr(data.cache, "WAIT_POLL_SECONDS", 0.01)
    later = make_cfg(f"file://{tmp_path}/other", corpus)
    looks = []
    real_read = data.cache.read_manifest

    def read(st):
        looks.append(1)
        if len(looks) == 3:  # process 0 finishes meanwhile
            data.ensure_cache(later, "train", process_index=0)
        return real_read(st)

    monkeypatch.setattr(data.cache, "read_manifest", read)
    capsys.readouterr()
    _, _, built = data.ensure_cache(later, "train", process_index=1)
    assert not built and "waiting for process 0" in capsys.readouterr().err


def test_bad_url_is_one_line(tmp_path):
    cfg = make_cfg("nosuchscheme://bucket/tokens", tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(data.DataError, match="data.cache_dir=nosuchscheme://bucket/tokens"):
        data.ensure_cache(cfg, "train")


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from gptjax import data
    from gptjax.config import config_from_dict
    out = {}
    for cache_dir in sys.argv[4:]:
        cfg = config_from_dict({
            "model": {"vocab_size": 257, "context_length": %d, "local_window": 8},
            "data": {"source": sys.argv[3] + "/*.jsonl", "cache_dir": cache_dir,
                     "val_fraction": 0.2, "pipeline": "threads"}})
        try:
            built = data.ensure_cache(cfg, "train", process_index=jax.process_index())[2]
        except data.DataError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        with data.TrainIterator(cfg, 4) as it:
            rows = [next(it)["inputs"].tolist() for _ in range(4)]
        out[cache_dir] = {"built": built, "rows": rows, "index": jax.process_index()}
    print(json.dumps(out))
""" % T)


def two_processes(corpus: Path, dirs: list[str]) -> tuple[list[int], list[tuple[str, str]]]:
    """SCRIPT run as the two processes of one jax.distributed run: (exit codes, outputs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, f"127.0.0.1:{port}", str(i),
                          str(corpus), *dirs], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_two_processes_build_one_cache_and_read_one_process_batches(corpus, tmp_path):
    dirs = [f"file://{tmp_path}/url", str(tmp_path / "shared")]
    codes, outs = two_processes(corpus, dirs)
    for code, (_, err) in zip(codes, outs):
        assert code == 0, err[-2000:]
    got = [json.loads(out) for out, _ in outs]
    one = batches(make_cfg(str(tmp_path / "one"), corpus), process_index=0, process_count=1)
    for d in dirs:
        assert sorted(g[d]["index"] for g in got) == [0, 1]
        assert sorted(g[d]["built"] for g in got) == [False, True]  # built once
        if d.startswith("file://"):
            assert [g[d]["built"] for g in got if g[d]["index"] == 0] == [True]
        by_index = {g[d]["index"]: g[d]["rows"] for g in got}
        for step, want in enumerate(one):  # process p holds rows [2p, 2p + 2) of each batch
            np.testing.assert_array_equal(
                np.concatenate([by_index[0][step], by_index[1][step]]), want)
    assert "waiting for process 0" in outs[0][1] + outs[1][1]
    [cache] = [p for p in (tmp_path / "shared").iterdir() if not p.name.startswith(".")]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_when_process_0_cannot_build_the_others_stop_waiting(tmp_path):
    """A corrupt source: process 0 fails, and the process waiting for its manifest hears of it
    through the run's key-value store (else both would hang: it polling, process 0 in
    jax.distributed's shutdown, which waits for it)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.jsonl").write_text('{"text": "a b c"}\n{"text": ')
    codes, outs = two_processes(tmp_path / "src", [f"file://{tmp_path}/url"])
    assert codes == [2, 2], outs
    assert "bad.jsonl:2: not valid JSON" in outs[0][1]
    assert "process 0 could not build the token cache" in outs[1][1]
    assert "bad.jsonl:2: not valid JSON" in outs[1][1]


class FakeRunStore:
    """jax.distributed's key-value store, as far as the cache uses it."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self.values[key] = value

    def key_value_try_get(self, key: str) -> str | None:
        return self.values.get(key)


def test_a_process_whose_files_differ_from_process_0s_stops(corpus, tmp_path, monkeypatch):
    """Another modification time on one host gives another digest, so another cache name:
    waiting for it would never end; process 0's "ok" names what it built instead."""
    src = tmp_path / "src"
    src.mkdir()
    for f in corpus.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    run = FakeRunStore()
    monkeypatch.setattr(data.cache, "_run_store", lambda: run)
    monkeypatch.setattr(data.cache, "WAIT_POLL_SECONDS", 0.01)
    cfg = make_cfg(f"file://{tmp_path}/url", src)
    data.ensure_cache(cfg, "train", process_index=0)
    assert [v[:3] for v in run.values.values()] == ["ok:"]
    os.utime(src / "part0.jsonl", ns=(0, 0))  # what another host would see
    with pytest.raises(data.DataError, match="its source files differ") as e:
        data.ensure_cache(cfg, "train", process_index=1)
    assert "\n" not in str(e.value)


def test_an_unreadable_manifest_is_an_error_not_a_rebuild(corpus, tmp_path):
    cfg = make_cfg(str(tmp_path / "c"), corpus)
    manifest, path, _ = data.ensure_cache(cfg, "train")
    (path / "manifest.json").chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make it a directory, which no one reads
        (path / "manifest.json").unlink()
        (path / "manifest.json").mkdir()
    with pytest.raises(data.DataError, match="manifest.json"):
        data.ensure_cache(cfg, "train")
    assert (path / manifest["shards"][0]["file"]).exists()  # nothing was removed
