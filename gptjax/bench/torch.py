"""The PyTorch peers at a gptjax config's shape: a nanoGPT-style GPT written here (vocabulary
padded to a multiple of 64, fused QKV, flash attention through scaled_dot_product_attention, bf16
autocast, fused AdamW, torch.compile: what the field would pick) and Hugging Face's GPT-2
modelling code. Both are all-dense: compare with gptjax's attention_pattern=dense for like for
like. torch is imported inside the functions: it is an optional dependency (the `hf` extra)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from gptjax.errors import UserError

PEERS = ("nanogpt", "hf")
# torch.compile's modes, and "eager": no compile (what compiling buys; seconds, not a minute, on
# a CPU).
COMPILE_MODES = ("default", "max-autotune", "eager")


def _nanogpt(m: Any) -> Any:
    """A GPT-2-shaped model in the nanoGPT style at `m`'s shape (our code, after that design)."""
    import torch  # optional: the hf extra
    from torch import nn
    from torch.nn import functional as F

    vocab = -(-m.vocab_size // 64) * 64  # the padding nanoGPT uses: 50257 -> 50304

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(m.d_model), nn.LayerNorm(m.d_model)
            self.qkv = nn.Linear(m.d_model, 3 * m.d_model)
            self.proj = nn.Linear(m.d_model, m.d_model)
            self.fc, self.out = nn.Linear(m.d_model, m.d_ff), nn.Linear(m.d_ff, m.d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, m.n_head, D // m.n_head).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, m.d_model), nn.Embedding(m.context_length,
                                                                              m.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(m.n_layer))
            self.ln_f = nn.LayerNorm(m.d_model)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied
            return F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))

    return GPT()


def _hf(m: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel  # optional: the hf extra

    hf = GPT2Config(vocab_size=m.vocab_size, n_positions=m.context_length, n_embd=m.d_model,
                    n_layer=m.n_layer, n_head=m.n_head, n_inner=m.d_ff, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(hf)
    model.config._attn_implementation = "sdpa"

    def loss(self: Any, idx: Any, targets: Any) -> Any:
        return self(input_ids=idx, labels=targets).loss

    model.loss_of = loss.__get__(model)
    return model


def bench_torch(m: Any, batch: int, steps: int, peer: str = "nanogpt",
                mode: str = "default") -> dict[str, Any]:
    """Train steps (AdamW, clip 1.0) of a peer under torch.compile(mode=mode) (uncompiled for
    "eager"), bf16 autocast on GPU; the graph breaks torch.compile reported."""
    import torch  # optional: the hf extra
    from torch._dynamo.utils import counters

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = (_nanogpt(m) if peer == "nanogpt" else _hf(m)).to(dev)
    forward = model if peer == "nanogpt" else model.loss_of
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev == "cuda")
    counters.clear()
    compiled = (forward if mode == "eager"
                else torch.compile(forward, mode=None if mode == "default" else mode))
    x = torch.randint(0, m.vocab_size, (batch, m.context_length), device=dev)
    bf16 = dev == "cuda" and m.dtype == "bfloat16"

    def step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = compiled(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
        step()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"peer": peer, "mode": mode, "step_ms_median": 1e3 * med,
            "step_ms_spread": 1e3 * (max(times) - min(times)),
            "tokens_per_s": batch * m.context_length / med, "compile_s": compile_s,
            "graph_breaks": sum(counters["graph_break"].values()), "device": dev,
            "torch_version": torch.__version__}


def torch_in_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    """The nanoGPT-style peer in every mode of args.torch_modes, Hugging Face's in the first,
    each in its own process (JAX would otherwise hold most of the GPU's memory while torch runs,
    or torch's cache while JAX runs), run before gptjax's own step. Returns each run, and per
    peer the best mode's tokens/s."""
    runs = []
    for peer in PEERS:
        for mode in (args.torch_modes if peer == "nanogpt" else args.torch_modes[:1]):
            cmd = [sys.executable, "-m", "gptjax.bench", "torch", "--config", args.config,
                   "--steps", str(args.steps), "--peer", peer, "--mode", mode, "--json",
                   *args.overrides]
            for flag, value in (("--batch", args.batch), ("--seq", args.seq)):
                if value:
                    cmd += [flag, str(value)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserError(f"the torch comparison ({peer}, {mode}) failed "
                                f"(exit {r.returncode}): {tail}")
            out = json.loads(r.stdout.strip().splitlines()[-1])
            runs.append({k: v for k, v in out.items() if k != "provenance"})
    best = {p: max((r["tokens_per_s"] for r in runs if r["peer"] == p)) for p in PEERS}
    return {"torch_runs": runs, **{f"torch_{p}_tokens_per_s": v for p, v in best.items()}}
