"""Tiny configs shared by the tests (kept small: the suite runs on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.tokenizer import Tokenizer


def tiny(**kw: object) -> ModelConfig:
    base = ModelConfig(
        vocab_size=101,
        context_length=48,
        n_layer=4,
        d_model=32,
        n_head=4,
        d_ff=64,
        attention_pattern=("dense", "local"),
        local_window=8,
        vocab_multiple=16,
    )
    return dataclasses.replace(base, **kw)


# Tests of the real GPT-2 BPE need tiktoken's r50k_base ranks; .ci/run points this variable at
# ../shared/data/r50k_base.tiktoken. Nothing is downloaded at test time.
needs_bpe = pytest.mark.skipif(
    not os.environ.get("GPTJAX_GPT2_BPE"),
    reason="GPTJAX_GPT2_BPE is not set (.ci/run sets it to ../shared/data/r50k_base.tiktoken)",
)


def mesh_specs(cfg: ModelConfig) -> object:
    """Mesh-axis PartitionSpecs of the parameters (what each array is split over)."""
    return jax.tree.map(
        lambda s: nn.logical_to_mesh_axes(tuple(s), sharding.RULES),
        sharding.param_specs(cfg),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


def write_corpus(d: Path) -> Path:
    """~120 KB of Python source as 30 .txt documents in `d` (deterministic)."""
    src = Path(json.__file__).parent  # any stdlib module's source will do
    text = "".join(p.read_text() for p in sorted(src.glob("*.py")))
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(text[i * 3000 : i * 3000 + 4000])
    return d


def write_run(d: Path, cfg: object, params: object = None, step: int = 0) -> Path:
    """A run directory holding `params` (default: fresh ones of cfg.model) at `step`, as the
    readers (sample.py, gptjax.eval, fewshot, the server, hf export) see a trained run; the
    optimizer state is a stand-in, which none of them reads."""
    import jax.numpy as jnp

    from gptjax import checkpoint, model

    if params is None:
        params = model.init_params(cfg.model, jax.random.key(0))
    c = checkpoint.Checkpointer(d, async_save=False)
    c.save(step, params, {"count": jnp.zeros((), jnp.int32)}, {}, checkpoint.make_meta(cfg, step))
    c.close()
    return d


def cudnn_as_xla(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stands in for cuDNN on this CPU: the backend counts as a GPU for the decoder's choice of
    kernel, and jax.nn.dot_product_attention runs its XLA version when asked for cuDNN. Returns
    the implementations asked for, call by call (traced calls), so a test can check that cuDNN
    was asked for at all."""
    from gptjax.model import attention

    real, asked = jax.nn.dot_product_attention, []

    def fake(*args, implementation=None, **kw):
        asked.append(implementation)
        return real(*args, implementation="xla" if implementation == "cudnn" else implementation,
                    **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(attention, "gpu_backend", lambda: True)
    return asked
