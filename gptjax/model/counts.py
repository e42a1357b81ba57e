"""Parameter and FLOP counts of a config: what the paper's Table 2.1 counts, and the FLOPs per
token that MFU divides by (PaLM's convention, docs/design.md)."""

from __future__ import annotations

import math

import jax

from gptjax.config import ModelConfig
from gptjax.model.gpt import param_shapes


def count_params(cfg: ModelConfig, include_padding: bool = False) -> int:
    """Parameters as the paper counts them: embeddings included, output projection tied."""
    shapes = param_shapes(cfg)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    if not include_padding:
        n -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model
    return n


def attention_flops_per_token(cfg: ModelConfig, seq: int | None = None) -> float:
    """Forward FLOPs per token of attention's two matmuls (scores, weighted values) over all
    layers: 4·H·Q·T for a dense layer, 4·H·Q·min(T, local_window) for a local one, whose
    queries each see only their band."""
    T = seq or cfg.context_length
    width = cfg.n_head * cfg.head_dim
    return sum(4.0 * width * (T if kind == "dense" else min(T, cfg.local_window))
               for kind in cfg.layer_kinds())


def matmul_params(cfg: ModelConfig) -> int:
    """N of the FLOP formulas: the parameters less the position table (a lookup, not a
    matmul); the token embedding stays, its tied matrix being the output projection."""
    return count_params(cfg) - cfg.context_length * cfg.d_model


def flops_per_token(cfg: ModelConfig, n_params: int | None = None, seq: int | None = None) -> float:
    """Model FLOPs per trained token, PaLM's convention: 6N + 12·L·H·Q·T, each local layer's
    attention term over min(T, local_window) (the work its band needs)."""
    n = matmul_params(cfg) if n_params is None else n_params
    return 6.0 * n + 3.0 * attention_flops_per_token(cfg, seq)


def hardware_flops_per_token(cfg: ModelConfig, seq: int | None = None) -> float:
    """FLOPs per trained token the device runs, recomputation included: remat `dots` recomputes
    the attention matmuls (they have batch dimensions, so they are not saved), `full` the whole
    forward pass. Equal to flops_per_token without remat."""
    extra = {"dots": attention_flops_per_token(cfg, seq),
             "full": 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq)}
    return flops_per_token(cfg, seq=seq) + extra.get(cfg.remat, 0.0)
