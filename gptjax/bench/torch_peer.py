"""The PyTorch peer: Hugging Face GPT-2 under torch.compile at a gptjax config's shape. torch is
imported inside the functions: it is an optional dependency (the `hf` extra)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from gptjax.errors import UserError


def bench_torch(m: Any, batch: int, steps: int) -> dict[str, Any]:
    """The same-shape Hugging Face GPT-2 train step (AdamW, clip 1.0) under torch.compile, bf16
    autocast on GPU. GPT-2 is all-dense: compare against gptjax with attention_pattern=dense for
    like-for-like, or with GPT-3's pattern to see what the banded layers buy."""
    import torch  # optional: the hf extra
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


def torch_in_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    """The torch comparison, run first and in its own process: JAX would otherwise hold most of
    the GPU's memory (it preallocates) while torch runs, or torch's cache while JAX runs."""
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
