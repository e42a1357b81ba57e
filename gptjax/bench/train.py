"""Train-step throughput and MFU on synthetic batches (no TensorFlow needed)."""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint, config, sharding
from gptjax.lora.adapters import LoraSpec
from gptjax.model import attention
from gptjax.train import plan
from gptjax.train import optim
from gptjax.bench.common import median_time
from gptjax.model import count_params, flops_per_token, hardware_flops_per_token
from gptjax.train.state import abstract_state, compile_train_step, init_state


def measure_matmul_tflops(n: int = 8192, repeats: int = 7, per_sample: int = 20) -> float:
    """bf16 [n, n] @ [n, n] → bf16 rate on the default device, random operands (zeros run
    faster): the median over `repeats` samples of `per_sample` products queued back to back,
    after a warm-up: the rate a well-shaped product reaches through XLA on this device."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.dot)
    sample = median_time(lambda: [mm(a, b) for _ in range(per_sample)], repeats)
    return 2 * n**3 * per_sample / sample / 1e12


def _time_steps(compiled: Any, state: Any, batch: Any, lr: jax.Array, steps: int,
                profile: str | None, base: Any = None) -> tuple[Any, Any, list[float]]:
    """(state, last metrics, seconds of each step) of `steps` timed steps after a warm-up one;
    with `profile`, 3 more steps traced into that folder beside the step's HLO."""
    state, metrics = compiled(state, batch, lr, base)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, lr, base)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    if profile:
        with jax.profiler.trace(profile):
            for _ in range(3):
                state, metrics = compiled(state, batch, lr, base)
            jax.block_until_ready(metrics["loss"])
        with open(os.path.join(profile, "step.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    return state, metrics, times


def _state_sizes(state: Any, spec: LoraSpec | None) -> dict[str, Any]:
    """What a run keeps and writes: trainable parameters, optimizer state bytes, the bytes of
    one checkpoint as the trainer saves it (orbax, params + optimizer state), and the process's
    peak resident memory so far."""
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        ckpt = checkpoint.Checkpointer(d, async_save=False)
        ckpt.save(0, state.params, state.opt_state, {}, {"step": 0})
        ckpt.close()
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    return {"lora": None if spec is None else spec.describe(),
            "trainable_params": sum(x.size for x in jax.tree.leaves(state.params)),
            "optimizer_state_bytes": nbytes(state.opt_state), "checkpoint_bytes": size,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bench_train(cfg_name: str, overrides: list[str], batch: int | None, seq: int | None,
                remat: str | None, steps: int, peak: bool | None = None,
                profile: str | None = None) -> dict[str, Any]:
    """Train-step throughput with synthetic batches (no TensorFlow needed).

    remat "auto" (or the config's model.remat=auto) compiles none, dots, full in that order and
    keeps the first whose memory (XLA's analysis) fits the device (plan.choose_remat). peak:
    also measure the bf16 matmul rate and report MFU against it (None: on GPU/TPU only).
    profile: a folder to write a profiler trace of 3 more steps into (TensorBoard/XProf's
    layout; `python -m gptjax.bench.xplane_summary` totals its device time by op)."""
    cfg = config.load_config(cfg_name, overrides)
    m = cfg.model
    if seq:
        m = dataclasses.replace(m, context_length=seq)
    cfg = dataclasses.replace(cfg, model=m)
    B = batch or cfg.train.batch_size
    cfg = config.replace_cfg(cfg, train={"batch_size": B, "microbatches": 1})
    mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.optim)
    lora = LoraSpec.of(cfg.train)
    with sharding.activate(mesh):
        _, sh = abstract_state(cfg, mesh, tx)
        state = init_state(cfg, mesh, tx, sh)
        # LoRA trains over a random base here: train.init_from is not read.
        base = None if lora is None else sharding.init_sharded_params(m, mesh, jax.random.key(1))
    T = m.context_length
    rng = np.random.default_rng(0)
    toks = rng.integers(0, m.vocab_size, size=(1, B, T + 1), dtype=np.int32)
    local = {"inputs": toks[..., :-1], "targets": toks[..., 1:], "mask": np.ones((1, B, T), np.float32)}
    compile_times: list[float] = []

    def compile_for(mc: config.ModelConfig) -> Any:
        t0 = time.perf_counter()
        compiled = compile_train_step(mc, tx, mesh, sh, state, batch_g, lora, base)
        compile_times.append(time.perf_counter() - t0)
        return compiled

    with sharding.activate(mesh):
        batch_g = sharding.to_global(local, mesh, stacked=True)
        lr = jnp.float32(1e-4)
        if (remat or m.remat) == "auto":
            m, (compiled,), tried = plan.choose_remat(cfg.model, lambda mc: [compile_for(mc)])
        else:
            m = dataclasses.replace(cfg.model, remat=remat or m.remat)
            compiled = compile_for(m)
            tried = {m.remat: plan.memory_need_gib(compiled)}
        compile_s, compile_total = compile_times[-1], sum(compile_times)
        state, metrics, times = _time_steps(compiled, state, batch_g, lr, steps, profile, base)
    med = statistics.median(times)
    tps = B * T / med
    spec = plan.device_peak_flops(cfg.train.peak_tflops)
    fpt = flops_per_token(m)
    out = {
        "config": cfg_name, "params": count_params(m), "batch": B, "seq": T, "remat": m.remat,
        "dtype": m.dtype,
        "attention": ("splash" if attention.use_splash(m.attention_impl) else
                      "cudnn" if attention.use_cudnn(m.attention_impl, m.dtype) else "xla"),
        "loss_chunk": m.loss_chunk, "pattern": "/".join(m.attention_pattern),
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "step_ms_median": 1e3 * med, "step_ms_spread": 1e3 * (max(times) - min(times)),
        "tokens_per_s": tps, "flops_per_token": fpt,
        "mfu": fpt * tps / (spec * jax.device_count()) if spec else None,
        "hfu": hardware_flops_per_token(m) * tps / (spec * jax.device_count()) if spec else None,
        "peak_tflops": spec / 1e12 if spec else None,
        "compile_s": compile_s, "compile_s_all_tried": compile_total,
        "memory_needed_gib": tried,
        "loss": float(metrics["loss"]),
        **_state_sizes(state, lora),
    }
    # The step's peak, read before the matmul probe below allocates its own operands.
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30 if stats and \
        "peak_bytes_in_use" in stats else None
    if peak if peak is not None else jax.default_backend() in ("gpu", "tpu"):
        rate = measure_matmul_tflops()
        out["matmul_tflops_measured"] = rate  # what XLA reaches on this card: context, not MFU
    return out
