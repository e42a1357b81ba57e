"""gptjax: GPT-3 in JAX/Flax.

    import gptjax
    cfg = gptjax.model_config("gpt3-small")
    model = gptjax.GPT(cfg)
    variables = model.init(key, tokens)
    logits = model.apply(variables, tokens)
    tok = gptjax.get_tokenizer("gpt2")
    out = gptjax.generate(variables["params"], cfg, prompts, max_new_tokens=64)
"""

from __future__ import annotations

import importlib
from typing import Any

from gptjax.config import (
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    load_config,
    model_config,
)
from gptjax.errors import ConfigError, UserError
from gptjax.model.losses import cross_entropy
from gptjax.model import GPT, count_params, init_cache, init_params, param_shapes

__version__ = "0.1.0"

# Imported on first use: the tokenizer pulls in tiktoken, sampling a few jitted programs.
_LAZY = {
    "get_tokenizer": ("gptjax.tokenizer", "get_tokenizer"),
    "generate": ("gptjax.decode.generate", "generate"),
    "load_params": ("gptjax.checkpoint", "load_params"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gptjax' has no attribute {name!r}")


__all__ = [
    "GPT",
    "Config",
    "ConfigError",
    "DataConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "TrainConfig",
    "UserError",
    "count_params",
    "cross_entropy",
    "generate",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_config",
    "load_params",
    "model_config",
    "param_shapes",
]
