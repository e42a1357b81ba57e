"""Faults that used to lose a run, hang a trainer or let two trainers share a run directory, each
reproduced on a tiny CPU config through train.py and shown handled (issue 14)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax import checkpoint, config, model
from gptjax.train import optim
from gptjax.eval import perplexity as gptjax_eval
from helpers import (TRAINED_STEPS, call_main, copy_run, process_env, script, train_in_process,
                     write_corpus)
from test_train import ROOT, loop_overrides, run_train

TRAIN_ENV = process_env()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(ocp.utils.checkpoint_steps(checkpoint.checkpoint_dir(run_dir)))


def one_error_line(r: subprocess.CompletedProcess | tuple[int, str], *needles: str) -> str:
    """The run ended with exit 2 and exactly one stderr line (no traceback) holding `needles`;
    `r` is a process or (exit code, stderr) of train.py's main run in this process."""
    code, stderr = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("train.py: error: ")]
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """`path` cannot be written, even by root (the CI runs as root): the immutable attribute
    there, permissions otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


def flip_bytes(step_dir: Path) -> None:
    """Flips bytes in the middle of the largest parameter data file: same size, new content."""
    data = max((p for p in (step_dir / "params").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0x5A
    data.write_bytes(bytes(raw))


@pytest.mark.slow
def test_resume_under_other_clipping_and_decay_continues(trained_run: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """optim.clip_norm or weight_decay set to 0 used to change the optimizer state's structure:
    no checkpoint restored, the run started over at step 0 and keep-N deleted the originals."""
    corpus, shared = trained_run
    run_dir = copy_run(shared, tmp_path / "run")  # trained to TRAINED_STEPS, default clipping
    last = TRAINED_STEPS
    r = run_train(loop_overrides(corpus, run_dir, steps=last + 4, **{
        "optim.clip_norm": 0, "optim.weight_decay": 0}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and f"at step {last}" in r.stdout
    assert steps_on_disk(run_dir)[-2:] == [last, last + 4]


@pytest.mark.slow
def test_optimizer_state_has_one_structure_for_any_clipping_and_decay() -> None:
    params = model.init_params(config.ModelConfig(vocab_size=64, context_length=16, n_layer=2,
                                                  d_model=16, n_head=2, d_ff=32), jax.random.key(0))
    trees = [jax.tree.structure(optim.make_optimizer(config.OptimConfig(
        clip_norm=c, weight_decay=w)).init(params)) for c in (0.0, 1.0) for w in (0.0, 0.1)]
    assert all(t == trees[0] for t in trees)
    # Off is exactly off: no clipping at 0, nothing added at weight decay 0.
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    off = optim.make_optimizer(config.OptimConfig(clip_norm=0.0, weight_decay=0.0))
    adam = optim.optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)
    got, _ = off.update(grads, off.init(params), params)
    want, _ = adam.update(grads, adam.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_no_restorable_checkpoint_stops_and_keeps_everything(trained_run: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    corpus, shared = trained_run
    run_dir = copy_run(shared, tmp_path / "run")
    before = steps_on_disk(run_dir)
    for step in before:  # every step unreadable: each loses a parameter file
        shutil.rmtree(checkpoint.checkpoint_dir(run_dir) / str(step) / "params" / "d")
        shutil.rmtree(checkpoint.checkpoint_dir(run_dir) / str(step) / "params" / "ocdbt.process_0")
    metrics = (run_dir / "metrics.jsonl").read_text()
    r = run_train(loop_overrides(corpus, run_dir, steps=TRAINED_STEPS + 8))
    one_error_line(r, "no checkpoint", "can be restored", *(f"step {s}" for s in before))
    assert steps_on_disk(run_dir) == before  # nothing deleted, nothing trained
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_moved_aside_and_an_older_one_resumes(
        trained_run: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    corpus, shared = trained_run
    run_dir = copy_run(shared, tmp_path / "run")  # checkpoints 8, 16 and 24
    last = TRAINED_STEPS
    flip_bytes(checkpoint.checkpoint_dir(run_dir) / str(last))
    # sample.py and gptjax.eval on the newest step by name refuse it in one line.
    code, _, err = call_main(script("sample").main, [
        "--checkpoint", str(run_dir), "--step", str(last), "--prompt", "x",
        "--max-new-tokens", "2"], capsys)
    assert code == 2 and "fails its checksum" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err
    r = run_train(loop_overrides(corpus, run_dir, steps=last + 8))
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [ln for ln in r.stderr.splitlines() if f"step {last} is unreadable" in ln]
    assert len(warnings) == 1 and "fails its checksum" in warnings[0]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stdout and f"at step {last - 8}" in r.stdout
    moved = list((run_dir / checkpoint.UNREADABLE_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(f"{last}.")
    assert steps_on_disk(run_dir)[-1] == last + 8


def test_non_finite_parameters_are_refused_by_sample_and_eval(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config.load_config("default", [f"train.run_dir={tmp_path / 'run'}"])
    params = model.init_params(cfg.model, jax.random.key(0))
    params["wte"] = params["wte"].at[3, 3].set(jnp.nan)
    ckpt = checkpoint.Checkpointer(tmp_path / "run", async_save=False)
    opt = optim.make_optimizer(cfg.optim)
    ckpt.save(5, params, opt.init(params), {}, checkpoint.make_meta(cfg, 5, {"tokens": 0}))
    ckpt.close()
    # The commands' mains in this process (test_bad_input and test_eval start their processes).
    for main, args in ((script("sample").main, ["--prompt", "x"]),
                       (gptjax_eval.main, ["--max-tokens", "100"])):
        code, _, err = call_main(main, ["--checkpoint", str(tmp_path / "run"), *args], capsys)
        assert code == 2, err[-2000:]
        assert "not finite" in err and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].split(": error: ")[1].startswith("no readable")


@pytest.mark.slow
def test_unwritable_checkpoints_end_the_run_in_one_line(corpus: Path, tmp_path: Path) -> None:
    """The asynchronous write failed in the background and the process never exited."""
    run_dir = tmp_path / "run"
    with unwritable(checkpoint.checkpoint_dir(run_dir)):
        start = time.monotonic()
        r = run_train(loop_overrides(corpus, run_dir, steps=24), timeout=180)
        took = time.monotonic() - start
    one_error_line(r, "writing checkpoint step 8", "failed")
    last = max(int(ln.split()[1].split("/")[0]) for ln in r.stdout.splitlines()
               if ln.startswith("step ") and "/" in ln.split()[1])
    assert last <= 16, "the run went on past the next checkpoint interval"
    assert took < 150


def test_unusable_run_dir_is_one_line(corpus: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    one_error_line(train_in_process(loop_overrides(corpus, afile, steps=2), monkeypatch, capsys),
                   "train.run_dir")
    locked = tmp_path / "locked"
    with unwritable(locked):
        one_error_line(train_in_process(loop_overrides(corpus, locked / "run", steps=2),
                                        monkeypatch, capsys), "train.run_dir")


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_dead_ones_lock_is_taken_over(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                              *loop_overrides(corpus, run_dir, steps=100000)],
                             env=TRAIN_ENV, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # training has started: the lock is held
            if line.startswith("step "):
                break
        # The second trainer: train.py's main in this process, refused by the first's lock.
        r = train_in_process(loop_overrides(corpus, run_dir, steps=4), monkeypatch, capsys)
        one_error_line(r, "in use by another trainer", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    metrics = (run_dir / "metrics.jsonl").read_text()
    r = run_train(loop_overrides(corpus, run_dir, steps=4, **{"train.checkpoint_every": 100}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"from a trainer that is gone (host {os.uname().nodename} pid {first.pid})" in r.stderr
    # The refused trainer wrote nothing: every metrics line came from one writer, once each.
    steps = [ln for ln in metrics.splitlines()]
    assert len(steps) == len(set(steps))


@pytest.mark.slow
def test_first_signal_is_reported_at_once_and_a_second_exits(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Every step evaluates the whole validation split with a model large enough that a step
    # takes 1.5-3 s here, so both signals arrive mid-step. (With the loop's usual tiny model a
    # step took 0.2 s: the run could stop cleanly before the second signal came.)
    args = loop_overrides(corpus, run_dir, steps=100000, **{
        "train.eval_every": 1, "train.eval_batches": 0, "train.checkpoint_every": 2,
        "data.val_fraction": 0.5, "model.n_layer": 4, "model.d_model": 256, "model.d_ff": 1024})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=TRAIN_ENV,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: errors.extend(
        (time.monotonic(), ln) for ln in proc.stderr), daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            if line.startswith("step 2 | validation"):
                break
        deadline = time.monotonic() + 60
        while not steps_on_disk(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)  # until a checkpoint is committed
        committed = steps_on_disk(run_dir)
        assert committed, "no checkpoint was committed"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        said: list[tuple[float, str]] = []
        while not said and time.monotonic() - sent < 0.5:
            time.sleep(0.01)
            said = [(t, ln) for t, ln in errors if "SIGINT: stopping after this step" in ln]
        assert said and said[0][0] - sent < 0.5, errors  # before the step in flight ended
        proc.send_signal(signal.SIGINT)  # at once: the step in flight has seconds to go
        proc.wait(timeout=30)
    finally:
        proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 130, errors
    assert any("second interrupt: exiting now" in ln for _, ln in errors), errors
    assert steps_on_disk(run_dir)[: len(committed)] == committed


def test_object_store_run_dirs_keep_their_scheme(capsys) -> None:
    """pathlib turns gs://b/x into the local gs:/b/x; run directories go through etils.epath."""
    assert str(checkpoint.checkpoint_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"
    lock = checkpoint.RunLock(checkpoint.run_path("gs://bucket/run"))
    lock.acquire()  # no file locks there: a warning, and nothing written
    lock.release()
    assert "object store" in capsys.readouterr().err
    assert str(checkpoint.checkpoint_dir("~/r")) == os.path.expanduser("~/r/checkpoints")


def test_watcher_stops_only_on_sigint_or_sigterm_and_closes_its_pipe() -> None:
    from gptjax.train.progress import Console
    from gptjax.train.trainer import Preemption

    fds = len(os.listdir("/proc/self/fd"))
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # another handler's signal
    try:
        with Preemption(Console(quiet=True)) as p:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.3)
            assert not p.requested
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not p.requested and time.monotonic() < deadline:
                time.sleep(0.05)
            assert p.requested
    finally:
        signal.signal(signal.SIGUSR1, old)
    time.sleep(0.3)  # the watcher reads EOF and closes its end
    assert len(os.listdir("/proc/self/fd")) == fds


def test_bad_streak_anywhere_in_a_log_interval_stops_the_run() -> None:
    """Seven non-finite steps then three good ones in one interval of 10: the old check read
    the interval's last step only (streak 0) and went on."""
    from gptjax.errors import UserError
    from gptjax.train.progress import Console, Progress

    log = types.SimpleNamespace(write=lambda record: None)  # the records are not checked here
    progress = Progress(Console(quiet=True), log, total_steps=100, tokens=0,
                        flops_per_token=1.0, hardware_flops_per_token=1.0, peak_flops=None,
                        max_bad_steps=5)
    streaks = [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    for i, b in enumerate(streaks, 1):
        progress.record(i, 1e-3, i * 10, 1, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1),
                                            "skipped": jnp.bool_(b > 0),
                                            "bad_streak": jnp.int32(b)})
    with pytest.raises(UserError, match="7 training steps in a row"):
        progress.flush(10, 100)
