"""The model: the GPT module (gpt.py), its parameter and FLOP counts (counts.py), attention
kernels (attention.py, splash.py) and the loss (losses.py). It knows nothing of meshes, files
or command lines."""

from gptjax.model.counts import (
    attention_flops_per_token,
    count_params,
    flops_per_token,
    hardware_flops_per_token,
    matmul_params,
)
from gptjax.model.gpt import (
    Attention,
    Block,
    BlockGroup,
    GPT,
    LORA,
    LayerNorm,
    Mlp,
    cast_to_compute_dtype,
    constrain,
    gelu_tanh,
    init_cache,
    init_params,
    layer_norm,
    logits_from_hidden,
    param_shapes,
    stack_layers,
    unstack_layers,
    variables,
)

__all__ = [
    "Attention",
    "Block",
    "BlockGroup",
    "GPT",
    "LORA",
    "LayerNorm",
    "Mlp",
    "attention_flops_per_token",
    "cast_to_compute_dtype",
    "constrain",
    "count_params",
    "flops_per_token",
    "gelu_tanh",
    "hardware_flops_per_token",
    "init_cache",
    "init_params",
    "layer_norm",
    "logits_from_hidden",
    "matmul_params",
    "param_shapes",
    "stack_layers",
    "unstack_layers",
    "variables",
]
