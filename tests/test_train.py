"""Optimizer, train step and the training loop (in-process and through train.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax import checkpoint, config, model, sharding
from gptjax.errors import UserError
from gptjax.train import plan
from gptjax.train import optim
from gptjax.train import state as train_state
from gptjax.config import OptimConfig, TrainConfig
from helpers import (TRAINED_STEPS, call_main, copy_run, keep_xla_flags, loop_overrides,
                     process_env, script, tiny, train_in_process, write_corpus)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- optimizer


def test_learning_rate_schedule_in_tokens() -> None:
    o = OptimConfig(learning_rate=6e-4, warmup_tokens=375_000_000, decay_tokens=260_000_000_000,
                    min_lr_ratio=0.1)
    assert optim.learning_rate(o, 0) == 0.0
    assert optim.learning_rate(o, 375_000_000 // 2) == pytest.approx(3e-4)
    assert optim.learning_rate(o, 375_000_000) == pytest.approx(6e-4)  # warmup end = peak
    mid = (375_000_000 + 260_000_000_000) // 2
    assert optim.learning_rate(o, mid) == pytest.approx(0.5 * (6e-4 + 6e-5), rel=1e-6)
    assert optim.learning_rate(o, 260_000_000_000) == pytest.approx(6e-5)  # decay end = 10%
    assert optim.learning_rate(o, 300_000_000_000) == pytest.approx(6e-5)  # then the floor
    lrs = [optim.learning_rate(o, t) for t in range(375_000_000, 260_000_000_000, 10**10)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_decay_mask_covers_kernels_and_embeddings_only() -> None:
    from gptjax.model import init_params

    mask = optim.decay_mask(init_params(tiny(), jax.random.key(0)))
    block = mask["layers"]["block0"]
    assert mask["wte"] and mask["wpe"]
    assert block["attn"]["qkv_kernel"] and block["mlp"]["fc_kernel"] and block["mlp"]["proj_kernel"]
    assert not block["attn"]["qkv_bias"] and not block["mlp"]["fc_bias"]
    assert not block["ln1"]["scale"] and not block["ln1"]["bias"] and not mask["ln_f"]["scale"]


def test_batch_ramp_grows_in_power_of_two_microbatches() -> None:
    o = OptimConfig(ramp_start_tokens=32_768, ramp_tokens=4_000_000_000)
    t = TrainConfig(batch_size=256, microbatches=16)  # 16 sequences of 2048 per microbatch
    s = optim.BatchSchedule(o, t, 2048)
    assert s.sizes() == [1, 2, 4, 8, 16]
    assert s.num_microbatches(0) == 1  # 32k tokens = one microbatch of 16 x 2048
    seen = [s.num_microbatches(k * 100_000_000) for k in range(45)]
    assert seen == sorted(seen) and set(seen) == {1, 2, 4, 8, 16}
    assert s.num_microbatches(4_000_000_000) == 16 and s.tokens_per_step(5 * 10**9) == 256 * 2048
    # Halfway the wanted batch is ~half the full one; a power-of-two size never exceeds it.
    half = s.num_microbatches(2_000_000_000)
    assert half * 16 * 2048 <= 32_768 + 0.5 * (256 * 2048 - 32_768) < 2 * half * 16 * 2048
    no_ramp = optim.BatchSchedule(OptimConfig(ramp_tokens=0), t, 2048)
    assert no_ramp.num_microbatches(0) == 16


# ----------------------------------------------------------------------------- train step


def small_cfg(**model_kw) -> config.Config:
    return config.Config(
        model=tiny(**model_kw),
        optim=OptimConfig(learning_rate=3e-3, warmup_tokens=0, decay_tokens=10**9),
        train=TrainConfig(batch_size=8),
        mesh=config.MeshConfig(data=1, fsdp=1, tensor=1),
    )


def synthetic_batch(cfg: config.Config, n: int, b: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = cfg.model.context_length
    # A learnable stream: each row counts up from a random start (mod vocab).
    start = rng.integers(0, cfg.model.vocab_size, size=(n, b, 1))
    seq = (start + np.arange(T + 1)) % cfg.model.vocab_size
    return {"inputs": seq[..., :-1].astype(np.int32), "targets": seq[..., 1:].astype(np.int32),
            "mask": np.ones((n, b, T), np.float32)}


def make_step(cfg: config.Config, mesh):
    tx = optim.make_optimizer(cfg.optim)
    with sharding.activate(mesh):
        _, sh = train_state.abstract_state(cfg, mesh, tx)
        state = train_state.init_state(cfg, mesh, tx, sh)
    fn = jax.jit(functools.partial(train_state.train_step, model_cfg=cfg.model, tx=tx),
                 in_shardings=(sh, sharding.batch_sharding(mesh, 3, stacked=True), None),
                 out_shardings=(sh, None))

    def step(state, batch, lr=1e-3):
        with sharding.activate(mesh):
            return fn(state, sharding.to_global(batch, mesh, stacked=True), jnp.float32(lr))

    return state, step


def one_device_mesh():
    return sharding.make_mesh(config.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.slow
def test_loss_falls_within_30_steps() -> None:
    cfg = small_cfg()
    state, step = make_step(cfg, one_device_mesh())
    losses = []
    for i in range(30):
        state, m = step(state, synthetic_batch(cfg, 1, 8, seed=i), lr=3e-3)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.15)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [0, 16])
def test_accumulated_microbatches_equal_one_big_batch(loss_chunk: int) -> None:
    # loss_chunk 16: the presets' combination, the fused loss inside the accumulation loop.
    cfg = small_cfg(loss_chunk=loss_chunk)
    mesh = one_device_mesh()
    big = synthetic_batch(cfg, 1, 8, seed=3)
    split = {k: v.reshape(4, 2, *v.shape[2:]) for k, v in big.items()}
    s1, step = make_step(cfg, mesh)
    s2, _ = make_step(cfg, mesh)
    a, ma = step(s1, big)
    b, mb = step(s2, split)
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    assert float(ma["grad_norm"]) == pytest.approx(float(mb["grad_norm"]), rel=1e-5)
    # Adam's first step is ~lr·g/(|g| + eps), so an entry whose gradient is near eps moves by a
    # visible part of lr when rounding (summation order) changes g: allow 1% of the learning rate
    # (one entry in 4096 moved by 0.12% under XLA:CPU's -O0 code generation; a wrong mean over
    # the microbatches would move them all, and the loss and gradient norm above are tight).
    atol = 1e-2 * cfg.optim.learning_rate
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [0, 16])
def test_sharded_step_equals_unsharded(loss_chunk: int) -> None:
    # loss_chunk 16: the fused chunked loss, its embedding gradient sharded like wte.
    cfg = small_cfg(loss_chunk=loss_chunk)
    batch = synthetic_batch(cfg, 2, 8, seed=5)
    ref_state, ref_step = make_step(cfg, one_device_mesh())
    mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
    state, step = make_step(cfg, mesh)
    for _ in range(2):
        ref_state, ref_m = ref_step(ref_state, batch)
        state, m = step(state, batch)
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-5)
    # Sharded sums run in another order (which differs between CPUs, too). Adam's moments are
    # sums of gradients, so they differ only by that rounding; a lost or doubled reduction would
    # move them by a whole gradient.
    for x, y in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state.opt_state)):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(y.dtype, np.floating) and y.size > 1:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max())
    # Adam divides by the gradient's size, so for a gradient near zero (|g| ~ eps) rounding in g
    # becomes a visible part of the step: allow 5% of one step (lr 1e-3), far below any error
    # that moves whole updates.
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(x, y, rtol=0, atol=0.05 * 1e-3)
    fc = state.params["layers"]["block0"]["mlp"]["fc_kernel"]
    spec = jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert fc.sharding.spec == spec
    # Adam's moments are sharded like their parameters (not replicated).
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == fc.shape]
    assert len(moments) == 4 and all(x.sharding.spec == spec for x in moments)  # 2 blocks x mu, nu


@pytest.mark.slow
def test_non_finite_step_is_skipped() -> None:
    cfg = small_cfg()
    state, step = make_step(cfg, one_device_mesh())
    state, _ = step(state, synthetic_batch(cfg, 1, 8))
    before = jax.device_get(state.params)
    bad = synthetic_batch(cfg, 1, 8, seed=1)
    bad["mask"][0, 0, 3] = np.nan  # poisons the loss and every gradient
    state, m = step(state, bad)
    assert bool(m["skipped"]) and int(m["bad_streak"]) == 1 and int(state.step) == 2
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, y)
    state, m = step(state, bad)
    assert int(m["bad_streak"]) == 2
    state, m = step(state, synthetic_batch(cfg, 1, 8, seed=2))
    assert not bool(m["skipped"]) and int(m["bad_streak"]) == 0
    assert checkpoint.all_finite(state.params)


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run_train(args: list[str], *, devices: int = 1, timeout: float = 240,
              env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args],
                          env=process_env(devices, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_params(run_dir: Path):
    params, _, _, step = checkpoint.load_params(run_dir)
    return step, jax.device_get(params)


@pytest.mark.slow
def test_kill_9_and_resume_equals_uninterrupted(corpus: Path, tmp_path: Path) -> None:
    # Big enough that steps take tens of ms, so the kill lands mid-run.
    big = {"model.d_model": 128, "model.n_layer": 4, "model.d_ff": 512, "train.steps": 32,
           "train.checkpoint_every": 8, "train.eval_every": 100}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    r = run_train(loop_overrides(corpus, ref_dir, **big))
    assert r.returncode == 0, r.stderr[-2000:]

    env = process_env()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *loop_overrides(corpus, run_dir, **big)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    # Kill at the first log line after a checkpoint is committed (saves are async: on a slow
    # machine the step-8 save can still be in flight at step 12, and then there is nothing to
    # resume from). The kill may land while a later save is half-written; resume must skip it.
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    for line in proc.stdout:
        if (line.startswith("step ") and int(line.split()[1].split("/")[0]) > 8
                and ckpt_dir.is_dir() and ocp.utils.checkpoint_steps(ckpt_dir)):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    committed = ocp.utils.checkpoint_steps(ckpt_dir)
    partial = losses(run_dir)
    assert max(partial) < 32 and max(committed) < 32

    r = run_train(loop_overrides(corpus, run_dir, **big))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    assert losses(run_dir) == losses(ref_dir)  # every step once, bitwise-equal values
    s1, p1 = final_params(ref_dir)
    s2, p2 = final_params(run_dir)
    assert s1 == s2 == 32
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_0(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = process_env()
    args = loop_overrides(corpus, run_dir, **{"train.steps": 100000, "train.checkpoint_every": 100000,
                                              "train.eval_every": 100000})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 8/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpoint saved" in out
    steps = checkpoint.Checkpointer(run_dir).all_steps()
    assert len(steps) == 1 and 8 <= steps[0] < 100000
    assert max(losses(run_dir)) == steps[0]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(trained_run: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    corpus, shared = trained_run
    run_dir = copy_run(shared, tmp_path / "run")  # checkpoints 8, 16 and 24
    last = TRAINED_STEPS
    latest = run_dir / "checkpoints" / str(last) / "params"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    r = run_train(loop_overrides(corpus, run_dir, **{"train.steps": last}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step {last}" in r.stderr and "unreadable" in r.stderr
    assert "resumed from" in r.stdout and f"at step {last - 8}" in r.stdout
    # The unreadable step was deleted and written again: the run's latest checkpoint is good.
    _, _, _, step = checkpoint.load_params(run_dir)
    assert step == last


@pytest.mark.slow
def test_default_run_learns_and_other_model_config_is_refused(
        trained_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The shared run: loop_overrides(steps=24), trained in-process on one device.
    corpus, shared = trained_run
    assert TRAINED_STEPS == 24
    run_dir = copy_run(shared, tmp_path / "run")
    val = [json.loads(x)["val_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in x]
    assert len(val) == 3 and val[-1] < val[0]  # steps 0, 12 and 24
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").iterdir())
    # Refusals end before the first step: train.py's main in this process.
    code, err = train_in_process(loop_overrides(corpus, run_dir, **{"model.d_model": 32}),
                                 monkeypatch, capsys)
    assert code == 2
    assert "different model config" in err and "model.d_model" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Fine-tuning: parameters only (step 0, fresh optimizer) from the trained run.
    tuned = tmp_path / "tuned"
    r = run_train(loop_overrides(corpus, tuned, **{"train.steps": 4, "train.init_from": run_dir}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fine-tuning" in r.stdout and "resumed" not in r.stdout
    assert losses(tuned)[1] < losses(run_dir)[1] - 0.5  # starts from the trained weights
    # ... also into the other layer layout (the run is unrolled, as the demo config; 2.7B and up
    # scan).
    scanned = tmp_path / "scanned"
    r = run_train(loop_overrides(corpus, scanned, **{"train.steps": 4, "train.init_from": run_dir,
                                                     "model.scan_layers": "true"}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert abs(losses(scanned)[1] - losses(tuned)[1]) < 1e-3
    code, err = train_in_process(loop_overrides(corpus, tmp_path / "x", **{
        "train.steps": 4, "model.d_ff": 128, "train.init_from": run_dir}), monkeypatch, capsys)
    assert code == 2 and "has shape" in err and "Traceback" not in err
    # A run resumes under another remat policy (it changes how the step runs, not the weights);
    # auto picks by XLA's memory analysis: on the CPU, which reports no limit, none. The loop
    # runs the program auto compiled: the step is compiled once.
    r = run_train(loop_overrides(corpus, run_dir, **{"train.steps": 26, "model.remat": "auto"}),
                  env={"JAX_LOG_COMPILES": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stdout and "model.remat=auto: none (XLA's memory need" in r.stdout
    assert r.stderr.count("Compiling jit(train_step)") == 1
    assert sorted(losses(run_dir))[-1] == 26


class _Analysis:
    def __init__(self, gib: float) -> None:
        self.argument_size_in_bytes = self.output_size_in_bytes = 4 << 30
        self.alias_size_in_bytes = 4 << 30  # the donated state: counted once
        self.temp_size_in_bytes = int((gib - 4) * 2**30)


class _Compiled:
    def __init__(self, gib: float) -> None:
        self.gib = gib

    def memory_analysis(self) -> _Analysis:
        return _Analysis(self.gib)


def test_choose_remat_keeps_the_least_recomputation_that_fits() -> None:
    needs = {"none": 30.0, "dots": 14.0, "full": 9.0}  # GiB per device, by "XLA's analysis"
    compiled = []

    def compile_fn(m):  # two batch shapes; the larger need counts
        compiled.append(m.remat)
        return [_Compiled(needs[m.remat] - 1), _Compiled(needs[m.remat])]

    cfg = tiny(remat="auto")
    for limit, want in ((100, "none"), (16, "dots"), (15, "full"), (None, "none")):
        compiled.clear()
        m, c, tried = plan.choose_remat(cfg, compile_fn, limit_gib=limit)
        assert m.remat == want and c[1].gib == needs[want] and compiled == list(tried)
        assert compiled == list(needs)[: list(needs).index(want) + 1]  # stops at the first fit
        assert tried[want] == pytest.approx(needs[want])
    # 10% of the device is kept for what the analysis leaves out (workspaces, fragmentation).
    assert plan.choose_remat(cfg, compile_fn, limit_gib=15.5, margin=1.0)[0].remat == "dots"
    with pytest.raises(UserError, match="no remat policy fits"):
        plan.choose_remat(cfg, compile_fn, limit_gib=9.5)

    def refusing(m):  # a compiler that rejects a program too large for the device (TPU)
        if m.remat == "none":
            raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
        return compile_fn(m)

    m, _, tried = plan.choose_remat(cfg, refusing, limit_gib=100)
    assert m.remat == "dots" and tried["none"] is None

    def broken(m):
        raise RuntimeError("INVALID_ARGUMENT: something else")

    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan.choose_remat(cfg, broken, limit_gib=100)


@pytest.mark.slow
def test_two_processes_equal_one_process(corpus: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    # Scanned layers (the demo config unrolls) and remat chosen by the processes together.
    common = {"train.steps": 8, "train.eval_every": 100, "train.checkpoint_every": 100,
              "mesh.data": -1, "model.scan_layers": "true", "model.remat": "auto"}
    r = run_train(loop_overrides(corpus, one, **common), devices=4)
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two"
    with socket.socket() as sock:  # a port that is free now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = process_env(2)
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *loop_overrides(corpus, two, **common),
             f"--coordinator=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "8 cpu device" not in outs[0][0]
    assert "model.remat=auto: none" in outs[0][0]  # process 0 logs
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5)


@pytest.mark.slow
def test_dry_run_175b_on_emulated_mesh() -> None:
    t = time.perf_counter()
    r = run_train(["--config", "configs/gpt3-175b.yaml", "--dry-run", "mesh.data=2",
                   "mesh.fsdp=16", "mesh.tensor=2"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parameters: 174,6" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("per device"))
    # 175B fp32 params over fsdp 16 x tensor 2 = 32 shards: ~20 GiB each; Adam's two moments twice that.
    params_gib = float(line.split("params ")[1].split(" GiB")[0])
    opt_gib = float(line.split("optimizer state ")[1].split(" GiB")[0])
    assert 19 < params_gib < 22 and 38 < opt_gib < 44
    assert "device-years" in r.stdout
    assert time.perf_counter() - t < 300


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.bogus=1"], "unknown config key model.bogus"),
        (["model.n_layer=x"], "model.n_layer: expected an integer"),
        (["--config", "nope"], "unknown config 'nope'"),
        (["mesh.data=3"], "needs 3 devices, but {n} are present"),
        (["train.batch_size=3", "mesh.data=-1"], None),
        # The state is built and the step compiled before the data is read: seconds.
        pytest.param(["data.source=/nonexistent/*.txt", "train.steps=1"], "/nonexistent/*.txt",
                     marks=pytest.mark.slow),
        (["--mfu", "abc"], "invalid float value"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], needle: str | None, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """train.py's main in this process (test_bad_input runs train.py as a process once)."""
    keep_xla_flags(monkeypatch)
    base = [f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    code, out, err = call_main(script("train").main, [*base, *args], capsys)
    assert code == 2, (out[-1000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    if needle:
        assert needle.format(n=jax.device_count()) in lines[0]
    else:
        assert "not divisible" in lines[0]


@pytest.mark.slow
def test_bf16_embedding_gradient_sums_in_fp32() -> None:
    """A token seen 8,192 times: its embedding row's gradient is a sum of 8,192 rows. Summed in
    bf16 it stalls (it came out at ~20% of the true value); the lookup gathers fp32 rows."""
    from gptjax.model.losses import sum_loss

    cfg = tiny(context_length=256, dtype="bfloat16", loss_chunk=64)
    params = model.init_params(cfg, jax.random.key(0))
    toks = jnp.full((32, 256), 7, jnp.int32)
    mb = {"inputs": toks, "targets": toks, "mask": jnp.ones((32, 256), jnp.float32)}
    grad = jax.grad(lambda p, c: sum_loss(p, c, mb)[0], argnums=0)
    got = grad(params, cfg)["wte"][7]
    ref = grad(params, dataclasses.replace(cfg, dtype="float32"))["wte"][7]
    assert float(jnp.linalg.norm(got - ref)) < 0.05 * float(jnp.linalg.norm(ref))
