"""Banded vs dense causal attention time as the sequence grows."""

from __future__ import annotations

import functools
from typing import Any

import jax

from gptjax.model import attention
from gptjax.bench.common import median_time


def bench_attention(seqs: list[int], window: int, heads: int, head_dim: int, batch: int,
                    repeats: int) -> dict[str, Any]:
    """CPU time of banded (local) vs dense causal attention as T grows, fp32."""
    rows = []
    for T in seqs:
        ks = jax.random.split(jax.random.key(T), 3)
        q, k, v = (jax.random.normal(kk, (batch, T, heads, head_dim)) for kk in ks)
        banded = jax.jit(functools.partial(attention.banded_attention, window=window))
        dense = jax.jit(functools.partial(attention.reference_attention, window=None))
        rows.append({
            "T": T,
            "banded_ms": 1e3 * median_time(lambda: banded(q, k, v), repeats),
            "dense_ms": 1e3 * median_time(lambda: dense(q, k, v), repeats),
        })
    first, last = rows[0], rows[-1]
    return {
        "window": window, "heads": heads, "head_dim": head_dim, "batch": batch, "rows": rows,
        "banded_growth": last["banded_ms"] / first["banded_ms"],
        "dense_growth": last["dense_ms"] / first["dense_ms"],
        "T_growth": last["T"] / first["T"],
    }
