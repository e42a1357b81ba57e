"""Scoring throughput of `gptjax.eval.scoring.loglikelihoods` (what few-shot evaluation and
lm-eval's loglikelihood requests run) against the train step's forward pass, on the same model:
`python -m gptjax.bench loglikelihood`."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import config, model
from gptjax.eval import scoring
from gptjax.bench.common import median_time
from gptjax.model.losses import cross_entropy


def _requests(cfg: config.ModelConfig, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Few-shot-like requests: contexts of a quarter to nearly all of the context length, answers
    of 1 to 8 tokens."""
    rng = np.random.default_rng(seed)
    T, V = cfg.context_length, cfg.vocab_size
    out = []
    for _ in range(n):
        m = int(rng.integers(1, 9))
        c = int(rng.integers(max(1, T // 4), T + 1 - m))
        out.append((rng.integers(0, V, c).tolist(), rng.integers(0, V, m).tolist()))
    return out


def bench_loglikelihood(cfg_name: str, overrides: list[str], *, requests: int = 256,
                        batch: int | None = None, train_batch: int | None = None,
                        repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Tokens/s of loglikelihood scoring and of the train step's forward pass (logits and loss
    of a train batch), random weights.

    Args:
      cfg_name, overrides: the config, as `train.py` takes it.
      requests: (context, answer) pairs per timed call (see _requests).
      batch: rows per scoring call at full context (default scoring.DEFAULT_BATCH).
      train_batch: sequences of the forward pass (default the config's train.batch_size).
      repeats: timed runs of each, after one untimed (compiling) run; medians reported.
    Returns:
      {"score_tokens_per_s", "forward_tokens_per_s", "ratio", medians' spreads, settings}.
    """
    cfg = config.load_config(cfg_name, overrides)
    m = cfg.model
    params = jax.jit(lambda k: model.init_params(m, k))(jax.random.key(seed))
    reqs = _requests(m, requests, seed)
    n_tokens = sum(len(c) + len(a) for c, a in reqs)
    bs = batch or scoring.DEFAULT_BATCH

    def score_once() -> float:
        t = time.perf_counter()
        scoring.loglikelihoods(params, m, reqs, batch_size=bs)  # returns host floats: synced
        return time.perf_counter() - t

    score_once()  # compiles every bucket
    score_times = [score_once() for _ in range(repeats)]

    B = train_batch or cfg.train.batch_size
    T = m.context_length
    toks = jnp.asarray(np.random.default_rng(seed).integers(0, m.vocab_size, (B, T + 1)),
                       jnp.int32)

    @jax.jit
    def forward(p: Any, x: jax.Array) -> jax.Array:
        return cross_entropy(model.GPT(m).apply({"params": p}, x[:, :-1]), x[:, 1:])[0]

    fwd_times = []
    forward(params, toks).block_until_ready()
    for _ in range(repeats):
        fwd_times.append(median_time(lambda: forward(params, toks), 1, warmup=False))
    score_s, fwd_s = statistics.median(score_times), statistics.median(fwd_times)
    out = {
        "config": cfg_name, "device": jax.devices()[0].device_kind, "dtype": m.dtype,
        "context_length": T, "requests": requests, "tokens_per_call": n_tokens,
        "score_batch": bs, "train_batch": B, "repeats": repeats,
        "score_s_median": score_s, "score_s_spread": max(score_times) - min(score_times),
        "score_tokens_per_s": n_tokens / score_s,
        "forward_s_median": fwd_s, "forward_s_spread": max(fwd_times) - min(fwd_times),
        "forward_tokens_per_s": B * T / fwd_s,
    }
    out["ratio"] = out["score_tokens_per_s"] / out["forward_tokens_per_s"]
    return out
