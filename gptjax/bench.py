"""Benchmarks (not tests): `python -m gptjax.bench {attention,train,decode,data} [options]`.

Each prints a small table and, with --json, one JSON object. Timings are medians over repeats
after a warm-up (compile excluded and reported separately); machines here are shared and noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_attention(seqs: list[int], window: int, heads: int, head_dim: int, batch: int,
                    repeats: int) -> dict[str, Any]:
    """CPU time of banded (local) vs dense causal attention as T grows, fp32."""
    import jax

    from gptjax import attention

    rows = []
    for T in seqs:
        ks = jax.random.split(jax.random.key(T), 3)
        q, k, v = (jax.random.normal(kk, (batch, T, heads, head_dim)) for kk in ks)
        banded = jax.jit(functools.partial(attention.banded_attention, window=window))
        dense = jax.jit(functools.partial(attention.reference_attention, window=None))
        rows.append({
            "T": T,
            "banded_ms": 1e3 * _median_time(lambda: banded(q, k, v), repeats),
            "dense_ms": 1e3 * _median_time(lambda: dense(q, k, v), repeats),
        })
    first, last = rows[0], rows[-1]
    return {
        "window": window, "heads": heads, "head_dim": head_dim, "batch": batch, "rows": rows,
        "banded_growth": last["banded_ms"] / first["banded_ms"],
        "dense_growth": last["dense_ms"] / first["dense_ms"],
        "T_growth": last["T"] / first["T"],
    }


def measure_matmul_tflops(n: int = 8192, repeats: int = 7, per_sample: int = 20) -> float:
    """bf16 [n, n] @ [n, n] → bf16 rate on the default device, random operands (zeros run
    faster): the median over `repeats` samples of `per_sample` products queued back to back,
    after a warm-up. Through XLA on an H200 this read 586-658 TFLOP/s (fp32 output converted to
    bf16, one product timed at a time, or 20 queued), where PyTorch's product reads about 790."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.dot)
    sample = _median_time(lambda: [mm(a, b) for _ in range(per_sample)], repeats)
    return 2 * n**3 * per_sample / sample / 1e12


def bench_train(cfg_name: str, overrides: list[str], batch: int | None, seq: int | None,
                remat: str | None, steps: int, peak: bool | None = None,
                profile: str | None = None) -> dict[str, Any]:
    """Train-step throughput with synthetic batches (no TensorFlow needed).

    remat "auto" (or the config's model.remat=auto) compiles none, dots, full in that order and
    keeps the first whose memory (XLA's analysis) fits the device (trainer.choose_remat). peak:
    also measure the bf16 matmul rate and report MFU against it (None: on GPU/TPU only).
    profile: a folder to write a profiler trace of 3 more steps into (TensorBoard/XProf's
    layout; `bench/xplane_summary.py` totals its device time by op)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptjax import config, optim, sharding, trainer
    from gptjax.attention import _use_cudnn
    from gptjax.model import count_params, flops_per_token

    cfg = config.load_config(cfg_name, overrides)
    m = cfg.model
    if seq:
        m = dataclasses.replace(m, context_length=seq)
    cfg = dataclasses.replace(cfg, model=m)
    B = batch or cfg.train.batch_size
    cfg = trainer.replace_cfg(cfg, train={"batch_size": B, "microbatches": 1})
    mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.optim)
    with sharding.activate(mesh):
        _, sh = trainer.abstract_state(cfg, mesh, tx)
        state = trainer.init_state(cfg, mesh, tx, sh)
    T = m.context_length
    rng = np.random.default_rng(0)
    toks = rng.integers(0, m.vocab_size, size=(1, B, T + 1), dtype=np.int32)
    local = {"inputs": toks[..., :-1], "targets": toks[..., 1:], "mask": np.ones((1, B, T), np.float32)}
    compile_times: list[float] = []

    def compile_for(mc: config.ModelConfig) -> Any:
        t0 = time.perf_counter()
        compiled = trainer.compile_train_step(mc, tx, mesh, sh, state, batch_g)
        compile_times.append(time.perf_counter() - t0)
        return compiled

    with sharding.activate(mesh):
        batch_g = trainer.to_global(local, mesh, stacked=True)
        lr = jnp.float32(1e-4)
        if (remat or m.remat) == "auto":
            m, (compiled,), tried = trainer.choose_remat(cfg.model, lambda mc: [compile_for(mc)])
        else:
            m = dataclasses.replace(cfg.model, remat=remat or m.remat)
            compiled = compile_for(m)
            tried = {m.remat: trainer.memory_need_gib(compiled)}
        compile_s, compile_total = compile_times[-1], sum(compile_times)
        state, metrics = compiled(state, batch_g, lr)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch_g, lr)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t)
        if profile:
            with jax.profiler.trace(profile):
                for _ in range(3):
                    state, metrics = compiled(state, batch_g, lr)
                jax.block_until_ready(metrics["loss"])
            with open(os.path.join(profile, "step.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
    med = statistics.median(times)
    tps = B * T / med
    spec = trainer.device_peak_flops(cfg.train.peak_tflops)
    fpt = flops_per_token(m)
    out = {
        "config": cfg_name, "params": count_params(m), "batch": B, "seq": T, "remat": m.remat,
        "dtype": m.dtype, "attention": "cudnn" if _use_cudnn(m.attention_impl, m.dtype) else "xla",
        "loss_chunk": m.loss_chunk, "pattern": "/".join(m.attention_pattern),
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "step_ms_median": 1e3 * med, "step_ms_spread": 1e3 * (max(times) - min(times)),
        "tokens_per_s": tps, "flops_per_token": fpt,
        "mfu": fpt * tps / (spec * jax.device_count()) if spec else None,
        "compile_s": compile_s, "compile_s_all_tried": compile_total,
        "memory_needed_gib": tried,
        "loss": float(metrics["loss"]),
    }
    # The step's peak, read before the matmul probe below allocates its own operands.
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30 if stats and \
        "peak_bytes_in_use" in stats else None
    if peak if peak is not None else jax.default_backend() in ("gpu", "tpu"):
        rate = measure_matmul_tflops()
        out["matmul_tflops_measured"] = rate
        out["mfu_vs_measured"] = fpt * tps / (rate * 1e12 * jax.device_count())
    return out


def bench_torch(m: Any, batch: int, steps: int) -> dict[str, Any]:
    """The same-shape Hugging Face GPT-2 train step (AdamW, clip 1.0) under torch.compile, bf16
    autocast on GPU. GPT-2 is all-dense: compare against gptjax with attention_pattern=dense for
    like-for-like, or with GPT-3's pattern to see what the banded layers buy."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T = m.context_length
    hf = GPT2Config(vocab_size=m.vocab_size, n_positions=T, n_embd=m.d_model, n_layer=m.n_layer,
                    n_head=m.n_head, n_inner=m.d_ff, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf).to(dev)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev == "cuda")
    compiled = torch.compile(model)
    x = torch.randint(0, m.vocab_size, (batch, T), device=dev)
    bf16 = dev == "cuda" and m.dtype == "bfloat16"

    def step() -> float:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
        step()
    sync()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"torch_step_ms_median": 1e3 * med, "torch_tokens_per_s": batch * T / med,
            "torch_compile_s": compile_s, "torch_device": dev, "torch_version": torch.__version__}


def _torch_in_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    """The torch comparison, run first and in its own process: JAX would otherwise hold most of
    the GPU's memory (it preallocates) while torch runs, or torch's cache while JAX runs."""
    import subprocess

    from gptjax.config import UserError

    cmd = [sys.executable, "-m", "gptjax.bench", "torch", "--config", args.config,
           "--steps", str(args.steps), "--json", *args.overrides]
    for flag, value in (("--batch", args.batch), ("--seq", args.seq)):
        if value:
            cmd += [flag, str(value)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the torch comparison failed (exit {r.returncode}): {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptjax.bench", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention", help="banded vs dense attention time as T grows")
    a.add_argument("--seqs", default="1024,2048,4096")
    a.add_argument("--window", type=int, default=256)
    a.add_argument("--heads", type=int, default=4)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--repeats", type=int, default=5)
    t = sub.add_parser("train", help="train-step tokens/s and MFU on synthetic batches")
    t.add_argument("--config", default="default")
    t.add_argument("--batch", type=int, default=None)
    t.add_argument("--seq", type=int, default=None)
    t.add_argument("--remat", choices=("none", "dots", "full", "auto"), default=None,
                   help="auto: the least recomputation whose memory fits the device")
    t.add_argument("--peak", choices=("auto", "yes", "no"), default="auto",
                   help="measure the bf16 matmul rate and report MFU against it (auto: GPU/TPU)")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--profile", metavar="DIR", default=None,
                   help="also write a profiler trace of 3 steps and the compiled HLO into DIR")
    t.add_argument("--compare-torch", action="store_true",
                   help="also time Hugging Face GPT-2 + torch.compile at the same shape")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    h = sub.add_parser("torch", help="Hugging Face GPT-2 + torch.compile train step at a "
                                     "config's shape (what train --compare-torch runs)")
    h.add_argument("--config", default="default")
    h.add_argument("--batch", type=int, default=None)
    h.add_argument("--seq", type=int, default=None)
    h.add_argument("--steps", type=int, default=10)
    h.add_argument("overrides", nargs="*", metavar="section.key=value")
    d = sub.add_parser("decode", help="prefill time, per-token latency, batched throughput")
    d.add_argument("--config", default="default")
    d.add_argument("--batch-sizes", default="1,64")
    d.add_argument("--prompt-len", type=int, default=None)
    d.add_argument("--new-tokens", type=int, default=None)
    d.add_argument("overrides", nargs="*", metavar="section.key=value")
    g = sub.add_parser("data", help="tokenizer MB/s and tokens/s from the cache")
    g.add_argument("--seq", type=int, default=2048)
    g.add_argument("--batch", type=int, default=8)
    for q in (a, t, h, d, g):
        q.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from gptjax import xla_flags
    from gptjax.config import UserError, load_config

    try:
        if args.what == "train":
            # Before JAX starts a backend: the flags train.py would set, unless overridden
            # (train.xla_flags=none measures without them). Decoding sets none, as sample.py.
            setting = load_config(args.config, args.overrides).train.xla_flags
            try:
                out_flags = xla_flags.apply(setting)
            except RuntimeError:  # called in-process after JAX started (tests, notebooks)
                print("warning: JAX has started; train.xla_flags not applied", file=sys.stderr)
                out_flags = []
        if args.what == "attention":
            seqs = [int(s) for s in args.seqs.split(",")]
            out = bench_attention(seqs, args.window, args.heads, args.head_dim, args.batch,
                                  args.repeats)
        elif args.what == "train":
            torch_out = _torch_in_subprocess(args) if args.compare_torch else None
            out = bench_train(args.config, args.overrides, args.batch, args.seq, args.remat,
                              args.steps, {"auto": None, "yes": True, "no": False}[args.peak],
                              args.profile)
            if torch_out is not None:
                out.update(torch_out)
                out["speedup_vs_torch"] = out["tokens_per_s"] / out["torch_tokens_per_s"]
        elif args.what == "torch":
            cfg = load_config(args.config, args.overrides)
            m = cfg.model
            if args.seq:
                m = dataclasses.replace(m, context_length=args.seq)
            out = bench_torch(m, args.batch or cfg.train.batch_size, args.steps)
        elif args.what == "decode":
            from gptjax import config, sampling

            cfg = config.load_config(args.config, args.overrides).model
            kw = {"batch_sizes": tuple(int(b) for b in args.batch_sizes.split(","))}
            if args.prompt_len:
                kw["prompt_len"] = args.prompt_len
            if args.new_tokens:
                kw["new_tokens"] = args.new_tokens
            out = sampling.benchmark(cfg, **kw)
        else:
            from gptjax import data

            out = data.benchmark(seq=args.seq, batch=args.batch)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.what in ("train", "decode"):
        out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        out["overrides"] = args.overrides
    if args.what == "train":
        out["xla_flags_added"] = out_flags
    if args.json:
        print(json.dumps(out))
    else:
        _print(out)
    return 0


def _print(out: dict[str, Any], indent: str = "") -> None:
    for k, v in out.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            print(f"{indent}{k}:")
            for row in v:
                print(indent + "  " + "  ".join(f"{rk}={_fmt(rv)}" for rk, rv in row.items()))
        elif isinstance(v, dict):
            print(f"{indent}{k}:")
            _print(v, indent + "  ")
        else:
            print(f"{indent}{k}: {_fmt(v)}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
