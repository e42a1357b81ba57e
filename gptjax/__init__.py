"""gptjax: GPT-3 in JAX/Flax.

    import gptjax
    cfg = gptjax.model_config("gpt3-small")
    model = gptjax.GPT(cfg)
    variables = model.init(key, tokens)
    logits = model.apply(variables, tokens)
    tok = gptjax.get_tokenizer("gpt2")
    out = gptjax.generate(variables["params"], cfg, prompts, max_new_tokens=64, key=key)

The pure pieces jit in user code: `loss` (a batch's summed token loss), `train_step` over a
`TrainState`, `sample_loop` over any logits function, and `generate_tokens`, the jittable core of
`generate` (the README shows each under `jax.jit`).
"""

from __future__ import annotations

from gptjax import xla_flags

xla_flags.quiet_libtpu_on_cpu_host()  # before anything below can start a JAX backend

from gptjax.lora.runs import load_model as load_params  # noqa: E402
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
from gptjax.decode.generate import generate, generate_tokens
from gptjax.decode.loop import Sampling, SamplerState, init_state, sample_loop
from gptjax.errors import ConfigError, UserError
from gptjax.model import GPT, count_params, init_cache, init_params, param_shapes
from gptjax.model.losses import cross_entropy
from gptjax.model.losses import sum_loss as loss
from gptjax.tokenizer import get_tokenizer
from gptjax.train.optim import make_optimizer
from gptjax.train.state import TrainState, train_step

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "Config",
    "ConfigError",
    "DataConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "SampleConfig",
    "Sampling",
    "SamplerState",
    "TrainConfig",
    "TrainState",
    "UserError",
    "count_params",
    "cross_entropy",
    "generate",
    "generate_tokens",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "init_state",
    "load_config",
    "load_params",
    "loss",
    "make_optimizer",
    "model_config",
    "param_shapes",
    "sample_loop",
    "train_step",
]
