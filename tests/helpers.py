"""Tiny configs shared by the tests (kept small: the suite runs on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from gptjax.config import ModelConfig


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
