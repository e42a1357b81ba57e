"""No corrupted input is trained on: a token cache changed after its build is caught when it is
loaded (checksums, re-hashed only when a file's stat changed), every batch's ids are checked
against the vocabulary (also through tf.data), and a cache_dir that cannot hold a cache is one
line, not a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import process_env
from test_data import T, make_cfg, one_line, write_corpus

from gptjax import data
from gptjax.config import replace_cfg
from gptjax.data import DataError, TrainIterator, eval_batches, load_split, load_tokens

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 257  # the byte tokenizer's


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def cfg(tmp_path: Path, corpus: Path):
    return make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files fully re-hashed while the test runs."""
    from gptjax.data import integrity

    calls: list[Path] = []
    real = integrity.file_sha256

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(integrity, "file_sha256", counting)
    return calls


def built(cfg, split: str = "train") -> tuple[dict, Path]:
    manifest, path, _ = data.ensure_cache(cfg, split)
    return manifest, path


def overwrite(file: Path, offset: int, payload: bytes, *, keep_mtime: bool = False) -> None:
    """Writes `payload` at `offset` in place: same file, same size."""
    st = file.stat()
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(payload)
    if keep_mtime:  # what `rsync --inplace -t` or `cp --preserve` would leave
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file.stat().st_size == st.st_size


def rerecord(path: Path, manifest: dict) -> None:
    """Records the token file's current sha256 in the manifest, as a cache written with bad ids
    by other code would have: only the range check can catch it then."""
    shard = manifest["shards"][0]
    sha256 = hashlib.sha256((path / shard["file"]).read_bytes()).hexdigest()
    shards = [dict(shard, sha256=sha256), *manifest["shards"][1:]]
    (path / "manifest.json").write_text(json.dumps(dict(manifest, shards=shards)))


def put_bad_id(path: Path, manifest: dict, position: int, value: int = 0xFFFF) -> None:
    tokens = np.memmap(path / manifest["shards"][0]["file"], dtype=manifest["dtype"], mode="r+")
    tokens[position] = value
    tokens.flush()
    del tokens


@contextlib.contextmanager
def read_only(directory: Path):
    """The directory made unwritable, for root too (chattr +i), or the test skipped."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(mode)
        return
    if not shutil.which("chattr"):
        pytest.skip("running as root without chattr: cannot make a directory read-only")
    r = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
    if r.returncode:
        pytest.skip(f"chattr +i failed: {r.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


# ---------------------------------------------------------------------------------------------
# Checksums on load


def test_fresh_cache_is_stamped_and_loads_without_rehashing(cfg, hashes):
    _, path = built(cfg)
    assert (path / "verified.json").exists()
    load_tokens(cfg, "train")
    with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
        next(it)
    assert hashes == []
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []  # no temp files


@pytest.mark.parametrize("how", ["flipped bytes", "ids beyond the vocabulary", "mtime restored"])
def test_in_place_overwrite_of_tokens_is_caught(cfg, how):
    manifest, path = built(cfg)
    tokens = path / "tokens.00000.bin"
    if how == "ids beyond the vocabulary":
        overwrite(tokens, 100, b"\xff" * 64)
    else:
        original = tokens.read_bytes()[100:164]
        overwrite(tokens, 100, bytes(b ^ 0x5A for b in original), keep_mtime=how != "flipped bytes")
    with pytest.raises(DataError) as e:
        load_tokens(cfg, "train")
    msg = one_line(e)
    assert type(e.value).__name__ == "CorruptCacheError"
    assert str(tokens) in msg and "sha256" in msg
    assert f"delete the token cache directory {path}" in msg
    # Still caught on the next load: a failed check stamps nothing.
    with pytest.raises(DataError, match="does not match"):
        TrainIterator(cfg, 4, process_index=0, process_count=1)


def test_touch_rehashes_once_and_restamps(cfg, hashes):
    _, path = built(cfg)
    (path / "tokens.00000.bin").touch()
    load_tokens(cfg, "train")
    assert hashes == [path / "tokens.00000.bin"]
    load_tokens(cfg, "train")
    load_split(cfg, "train")
    assert hashes == [path / "tokens.00000.bin"]  # the new look was stamped


@pytest.mark.parametrize("stamp", ["missing", "damaged"])
def test_cache_without_a_usable_stamp_is_hashed_once(cfg, hashes, stamp):
    """A cache built before stamps existed (or a torn stamp) costs one re-hash, not an error."""
    _, path = built(cfg)
    if stamp == "missing":
        (path / "verified.json").unlink()
    else:
        (path / "verified.json").write_text('{"format": 1, "files": {"tokens.00000.bin": [')
    tokens = np.asarray(load_tokens(cfg, "train"))
    assert hashes == [path / "tokens.00000.bin"]
    np.testing.assert_array_equal(load_tokens(cfg, "train"), tokens)
    assert hashes == [path / "tokens.00000.bin"]
    json.loads((path / "verified.json").read_text())


@pytest.mark.slow
def test_concurrent_loaders_leave_a_whole_stamp(cfg, tmp_path):
    """Processes of one run that all find a changed stat re-hash and re-stamp at once."""
    _, path = built(cfg)
    (path / "tokens.00000.bin").touch()
    script = (
        "from gptjax.config import config_from_dict\n"
        "from gptjax.data import load_tokens\n"
        f"cfg = config_from_dict({json.dumps(cfg_dict(cfg))})\n"
        "for _ in range(20):\n"
        "    load_tokens(cfg, 'train')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    stamp = json.loads((path / "verified.json").read_text())
    looks = stamp["files"]["tokens.00000.bin"]
    assert len(looks) == len({json.dumps(x, sort_keys=True) for x in looks})  # no duplicates
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []


def cfg_dict(cfg) -> dict:
    return {
        "model": {"vocab_size": cfg.model.vocab_size, "context_length": T, "local_window": 8},
        "data": {
            "source": cfg.data.source,
            "cache_dir": cfg.data.cache_dir,
            "val_fraction": cfg.data.val_fraction,
        },
    }


# ---------------------------------------------------------------------------------------------
# Loss weights


def completion_cfg(tmp_path: Path):
    src = tmp_path / "ft"
    src.mkdir()
    records = [
        {"prompt": f"question {i}? " * 3, "completion": f"answer {i}. " * 4} for i in range(40)
    ]
    (src / "ft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return make_cfg(tmp_path, f"{src}/*.jsonl", val_fraction=0.2)


def test_in_place_overwrite_of_the_mask_is_caught(tmp_path):
    cfg = completion_cfg(tmp_path)
    manifest, path = built(cfg)
    assert manifest["mask"] and manifest["shards"][0]["mask"] == "mask.00000.bin"
    assert manifest["shards"][0]["mask_sha256"]
    mask = path / "mask.00000.bin"
    overwrite(mask, 10, bytes(1 - b for b in mask.read_bytes()[10:40]))
    with pytest.raises(DataError) as e:
        load_split(cfg, "train")
    msg = one_line(e)
    assert str(mask) in msg and f"delete the token cache directory {path}" in msg


def test_cache_of_another_format_is_rebuilt(tmp_path, capsys):
    """A manifest of another cache format (a single token file, before shards) is not read."""
    cfg = completion_cfg(tmp_path)
    manifest, path = built(cfg)
    (path / "manifest.json").write_text(json.dumps(dict(manifest, format=1)))
    capsys.readouterr()
    again, path2, rebuilt = data.ensure_cache(cfg, "train")
    assert rebuilt and path2 == path and again["sha256"] == manifest["sha256"]
    assert "rebuilding" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Token ids against the vocabulary


@pytest.mark.parametrize("pipeline", ["tf.data", "threads"])
def test_out_of_range_id_stops_training_at_its_batch(cfg, capfd, pipeline):
    cfg = replace_cfg(cfg, data={"pipeline": pipeline})
    manifest, path = built(cfg)
    n = data.num_windows(manifest["tokens"], T, T)
    bad_window = n // 2
    position = bad_window * T + 5  # inside one window only (not the token windows share)
    put_bad_id(path, manifest, position)
    rerecord(path, manifest)
    order = list(data.permute(np.arange(n), n, cfg.data.seed, 0))
    bad_batch = order.index(bad_window) // 4
    capfd.readouterr()
    it = TrainIterator(cfg, 4, process_index=0, process_count=1)
    for _ in range(bad_batch):
        b = next(it)
        assert b["inputs"].max() < VOCAB and b["targets"].max() < VOCAB
    state = it.get_state()
    with pytest.raises(DataError) as e:
        next(it)
    msg = one_line(e)
    assert type(e.value).__name__ == "CorruptCacheError"
    assert f"token id {0xFFFF} at token {position} of {path / 'tokens.00000.bin'}" in msg
    assert "(train split)" in msg and f"vocabulary size {VOCAB}" in msg
    assert "delete the token cache directory" in msg
    # Raised in Python, not logged by the pipeline's threads; the position stays at the bad batch.
    assert "Traceback" not in capfd.readouterr().err
    assert it.get_state() == state
    with pytest.raises(DataError, match="token id"):
        next(it)
    it.close()


def test_out_of_range_id_stops_evaluation(cfg):
    manifest, path = built(cfg, "validation")
    position = (data.num_windows(manifest["tokens"], T, T) - 1) * T + 5  # in the last batch
    put_bad_id(path, manifest, position, VOCAB)
    rerecord(path, manifest)
    with pytest.raises(DataError) as e:
        list(eval_batches(cfg, 4, process_index=0, process_count=1))
    msg = one_line(e)
    assert f"token id {VOCAB} at token {position} of {path / 'tokens.00000.bin'}" in msg
    assert "(validation split)" in msg


def test_ids_that_wrapped_negative_are_out_of_range(cfg):
    """uint32 caches are cut into int32 rows: an id ≥ 2**31 arrives negative."""
    from gptjax.data import batches, load

    opened = load.open_split(cfg, "train")
    check = batches._id_check(opened)
    rows = np.zeros((2, T + 1), np.int32)
    check(rows, np.array([0, T]))
    rows[1, 3] = -7
    with pytest.raises(DataError, match=f"token id {2**32 - 7} at token {T + 3} "):
        check(rows, np.array([0, T]))


def test_model_vocabulary_smaller_than_the_tokenizer_is_refused_up_front(tmp_path, corpus):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    small = cfg.__class__(
        **{
            **cfg.__dict__,
            "model": cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": 200}),
        }
    )
    with pytest.raises(DataError, match="byte has 257 ids but model.vocab_size=200") as e:
        TrainIterator(small, 4, process_index=0, process_count=1)
    one_line(e)


# ---------------------------------------------------------------------------------------------
# Where the cache lies


def test_cache_dir_that_is_a_file(tmp_path, corpus):
    (tmp_path / "cache").write_text("not a directory")
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    with pytest.raises(DataError) as e:
        load_tokens(cfg, "train")
    msg = one_line(e)
    assert f"data.cache_dir={tmp_path / 'cache'} is not a directory" in msg


def test_unwritable_cache_dir(tmp_path, corpus):
    (tmp_path / "cache").mkdir()
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2)
    with read_only(tmp_path / "cache"), pytest.raises(DataError) as e:
        load_tokens(cfg, "train")
    msg = one_line(e)
    assert f"data.cache_dir={tmp_path / 'cache'} cannot be written" in msg


def test_read_only_complete_cache_still_loads(cfg, hashes, capsys):
    manifest, path = built(cfg)
    (path / "tokens.00000.bin").touch()  # its stamp no longer matches: this load must re-hash
    capsys.readouterr()
    with read_only(path), read_only(path.parent):
        tokens = load_tokens(cfg, "train")
        assert len(tokens) == manifest["tokens"]
        assert hashes == [path / "tokens.00000.bin"]
    assert capsys.readouterr().err == ""  # the stamp was not updated, quietly
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "tokens.00000.bin",
        "verified.json",
    ]


# ---------------------------------------------------------------------------------------------
# Through train.py


@pytest.mark.slow
@pytest.mark.parametrize("corruption", ["overwritten in place", "ids beyond the vocabulary"])
def test_train_py_refuses_a_corrupted_cache(tmp_path, corpus, corruption):
    cfg = make_cfg(tmp_path, f"{corpus}/*.txt", val_fraction=0.2, context=32)
    built(cfg, "validation")  # so that the run's only line on stderr is its error
    manifest, path = built(cfg)
    if corruption == "overwritten in place":
        overwrite(path / "tokens.00000.bin", 0, bytes(range(1, 101)))
        needle = "does not match the sha256"
    else:
        tokens = np.memmap(path / "tokens.00000.bin", dtype=np.uint16, mode="r+")
        tokens[::7] = 1000  # in every window
        tokens.flush()
        del tokens
        rerecord(path, manifest)
        needle = "token id 1000"
    args = [
        f"data.source={cfg.data.source}",
        f"data.cache_dir={cfg.data.cache_dir}",
        "data.val_fraction=0.2",
        "model.context_length=32",
        "model.local_window=8",
        "model.n_layer=2",
        "model.d_model=32",
        "model.n_head=2",
        "model.d_ff=64",
        f"train.run_dir={tmp_path / 'run'}",
        "train.batch_size=4",
        "train.steps=2",
        "train.eval_batches=1",
        "mesh.data=1",
    ]
    env = process_env()
    r = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("train.py: error: ") and needle in lines[0], lines[0]
    assert str(path) in lines[0]
