"""GPT-3: GPT-2's pre-LayerNorm block with layers alternating dense and banded causal attention.

The model knows nothing of meshes: parameters and key activations carry logical axis names
(batch, length, embed, heads, kv, mlp, vocab, layers) that sharding.py maps onto a mesh.
Layers are stacked with nn.scan over one period of `attention_pattern`, so a 96-layer model
compiles in the time of one period, or unrolled (scan_layers=False), which runs faster on GPU.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model import attention
from gptjax.config import ModelConfig

Cache = dict[str, Any]
REMAT_POLICY_FNS = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _param(module: nn.Module, name: str, names: tuple[str | None, ...], shape: tuple[int, ...],
           init: Any) -> jax.Array:
    cfg = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, names), shape,
                        jnp.dtype(cfg.param_dtype))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


LORA = "lora"  # the variable collection of low-rank adapters (gptjax.lora), beside "params"


def lora_update(module: nn.Module, target: str, x: jax.Array, subscripts: str,
                dropout: float) -> jax.Array | None:
    """The low-rank update (x·A)·B of adapter `target` of this module, or None where the "lora"
    collection has none. subscripts: "x,A,B->out" in the einsum letters of the base kernel, r
    the rank. An adapter with one more (leading) axis holds one adapter per batch row: the
    server's rows each apply their own. B arrives scaled by alpha / rank (gptjax.lora)."""
    if not module.has_variable(LORA, f"{target}_a"):
        return None
    dt = jnp.dtype(module.cfg.dtype)
    a = module.get_variable(LORA, f"{target}_a")
    b = module.get_variable(LORA, f"{target}_b")
    x_sub, a_sub, b_sub, out_sub = re.split(",|->", subscripts)
    if a.ndim > len(a_sub):  # per row
        a_sub, b_sub = "B" + a_sub, "B" + b_sub
    if dropout > 0:  # on the adapter's input only (as PEFT): the base path stays exact
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    h = jnp.einsum(f"{x_sub},{a_sub}->{x_sub[:2]}r", x.astype(dt), a.astype(dt))
    return jnp.einsum(f"{x_sub[:2]}r,{b_sub}->{out_sub}", h, b.astype(dt))


def variables(params: Any) -> dict[str, Any]:
    """What `GPT.apply` takes for a parameter tree: {"params": params}; adapters that a tree
    carries under its "lora" key (a LoRA run loaded for inference, gptjax.lora) go in as their
    own collection, beside the frozen weights."""
    if LORA not in params:
        return {"params": params}
    return {"params": {k: v for k, v in params.items() if k != LORA}, LORA: params[LORA]}


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta


class LayerNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D = self.cfg.d_model
        scale = _param(self, "scale", ("embed",), (D,), nn.initializers.ones)
        bias = _param(self, "bias", ("embed",), (D,), nn.initializers.zeros)
        return layer_norm(x_BTD, scale, bias, self.cfg.layer_norm_eps, self.cfg.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: str
               ) -> jax.Array:
    """LayerNorm over the last axis, statistics in fp32 whatever x's dtype, output in `dtype`.

    Its gradient keeps only x and the per-row mean and 1/std: autodiff of the same formula
    would keep three fp32 copies of the normalized activations per LayerNorm, memory traffic
    that a bf16 train step spends most of its non-matmul time on (docs/performance.md)."""
    return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _ln_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
    return (x - mean) * rstd, mean, rstd


def _layer_norm_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: str
                    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    xhat, mean, rstd = _ln_stats(x, eps)
    y = (xhat * scale + bias).astype(dtype)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps: float, dtype: str, res: tuple[jax.Array, ...], dy: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, mean, rstd, scale, bias = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    rows = tuple(range(dy.ndim - 1))
    dscale, dbias = (dy * xhat).sum(rows), dy.sum(rows)
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)

_GELU_C = math.sqrt(2 / math.pi)


@jax.custom_vjp
def gelu_tanh(h: jax.Array) -> jax.Array:
    """GPT-2's tanh approximation of GELU (as `nn.gelu(approximate=True)`), computed in fp32.

    Its gradient keeps only h and recomputes the tanh: autodiff would keep five more tensors of
    h's [B, T, d_ff] shape (tanh, its square's complement, products), written by the forward
    pass and read back by the backward. Like layer_norm, reverse mode only (custom_vjp): no
    jax.jvp or jacfwd through the model."""
    # In jax.nn.gelu's order of operations: bitwise its values in fp32; a bf16 h is computed in
    # fp32 and rounded once (nn.gelu would round every intermediate to bf16).
    hf = h.astype(jnp.float32)
    return (hf * (0.5 * (1 + jnp.tanh(_GELU_C * (hf + 0.044715 * hf**3))))).astype(h.dtype)


def _gelu_fwd(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu_tanh(h), h


def _gelu_bwd(h: jax.Array, dy: jax.Array) -> tuple[jax.Array]:
    # The barrier stops XLA from merging this tanh with the forward pass's (common-subexpression
    # elimination across unrolled layers), which kept the fp32 tanh of every layer alive from
    # the forward to the backward: 4 bytes per d_ff element (docs/performance.md).
    h, dy = jax.lax.optimization_barrier((h, dy))
    hf = h.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (hf + 0.044715 * hf**3))
    d = 0.5 * (1 + t) + 0.5 * hf * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * hf * hf)
    return ((dy.astype(jnp.float32) * d).astype(h.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


class Attention(nn.Module):
    cfg: ModelConfig
    kind: str  # "dense" | "local"
    attend_len: int | None = None  # see GPT
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cache: Cache | None, index_B: jax.Array | None,
                 num_valid_B: jax.Array | None) -> tuple[jax.Array, Cache | None]:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        D, H, K = cfg.d_model, cfg.n_head, cfg.head_dim
        normal = nn.initializers.normal(cfg.init_std)
        # Residual projections are scaled by 1/sqrt(2·n_layer) (GPT-2 §2.3): two per block.
        resid = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layer))
        # One fused [D, 3, H, K] kernel: one matmul, and Hugging Face's c_attn maps onto it.
        w_qkv = _param(self, "qkv_kernel", ("embed", None, "heads", "kv"), (D, 3, H, K), normal)
        b_qkv = _param(self, "qkv_bias", (None, "heads", "kv"), (3, H, K), nn.initializers.zeros)
        w_out = _param(self, "out_kernel", ("heads", "kv", "embed"), (H, K, D), resid)
        b_out = _param(self, "out_bias", ("embed",), (D,), nn.initializers.zeros)

        qkv = jnp.einsum("BTD,DCHK->CBTHK", x_BTD.astype(dt), w_qkv.astype(dt))
        qkv = _plus(qkv, lora_update(self, "qkv", x_BTD, "BTD,Dr,rCHK->CBTHK", self.lora_dropout))
        qkv = qkv + b_qkv.astype(dt)[:, None, None]
        q, k, v = (constrain(t, ("batch", "length", "heads", "kv")) for t in qkv)
        window = cfg.local_window if self.kind == "local" else None
        if cache is None:
            o_BTHK = attention.causal_attention(q, k, v, window=window, impl=cfg.attention_impl)
        else:
            o_BTHK, cache = attention.cached_attention(
                q, k, v, cache, index_B, num_valid_B, window, attend_len=self.attend_len,
                step_impl=cfg.decode_attention_impl)
        o_BTHK = constrain(o_BTHK, ("batch", "length", "heads", "kv"))
        y = jnp.einsum("BTHK,HKD->BTD", o_BTHK, w_out.astype(dt))
        y = _plus(y, lora_update(self, "out", o_BTHK, "BTHK,HKr,rD->BTD", self.lora_dropout))
        y = y + b_out.astype(dt)
        return constrain(y, ("batch", "length", "embed")), cache


class Mlp(nn.Module):
    cfg: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        D, F = cfg.d_model, cfg.d_ff
        normal = nn.initializers.normal(cfg.init_std)
        resid = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layer))
        w_fc = _param(self, "fc_kernel", ("embed", "mlp"), (D, F), normal)
        b_fc = _param(self, "fc_bias", ("mlp",), (F,), nn.initializers.zeros)
        w_proj = _param(self, "proj_kernel", ("mlp", "embed"), (F, D), resid)
        b_proj = _param(self, "proj_bias", ("embed",), (D,), nn.initializers.zeros)
        h_BTF = jnp.einsum("BTD,DF->BTF", x_BTD.astype(dt), w_fc.astype(dt))
        h_BTF = _plus(h_BTF, lora_update(self, "fc", x_BTD, "BTD,Dr,rF->BTF", self.lora_dropout))
        h_BTF = h_BTF + b_fc.astype(dt)
        # GPT-2's tanh approximation, so imported GPT-2 weights give GPT-2's outputs.
        h_BTF = constrain(gelu_tanh(h_BTF), ("batch", "length", "mlp"))
        y = jnp.einsum("BTF,FD->BTD", h_BTF, w_proj.astype(dt))
        y = _plus(y, lora_update(self, "proj", h_BTF, "BTF,Fr,rD->BTD", self.lora_dropout))
        y = y + b_proj.astype(dt)
        return constrain(y, ("batch", "length", "embed"))


class Block(nn.Module):
    cfg: ModelConfig
    kind: str
    attend_len: int | None = None
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache | None, index_B: jax.Array | None,
                 num_valid_B: jax.Array | None) -> tuple[jax.Array, Cache | None]:
        a, cache = Attention(self.cfg, self.kind, self.attend_len, self.lora_dropout, name="attn")(
            LayerNorm(self.cfg, name="ln1")(x), cache, index_B, num_valid_B
        )
        x = x + a
        x = x + Mlp(self.cfg, self.lora_dropout, name="mlp")(LayerNorm(self.cfg, name="ln2")(x))
        return x, cache


class BlockGroup(nn.Module):
    """One period of the attention pattern: a Block per entry of `attention_pattern`."""

    cfg: ModelConfig
    attend_len: int | None = None
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, caches: tuple[Cache, ...] | None, index_B: jax.Array | None,
                 num_valid_B: jax.Array | None) -> tuple[jax.Array, tuple[Cache, ...] | None]:
        new = []
        for j, kind in enumerate(self.cfg.attention_pattern):
            x, c = Block(self.cfg, kind, self.attend_len, self.lora_dropout, name=f"block{j}")(
                x, None if caches is None else caches[j], index_B, num_valid_B
            )
            new.append(c)
        return x, None if caches is None else tuple(new)


class GPT(nn.Module):
    """GPT-3. `apply(variables, tokens)` → float32 logits [B, T, vocab_size].

    With `cache=` (see `init_cache`) it runs incrementally: tokens [B, T] sit at positions
    cache["index"] + 0..T-1, the first `num_valid` [B] of each row are committed to the cache,
    and it returns (logits, new_cache).

    attend_len (decoding): dense layers read only the first attend_len cache positions, which
    must hold every position the call attends (index + T <= attend_len), so a step costs what
    the sequence so far needs rather than the whole cache.

    Low-rank adapters (gptjax.lora) ride in a second collection beside the frozen weights:
    `apply({"params": base, "lora": adapters}, ...)`; lora_dropout (training) then needs a
    "dropout" rng.
    """

    cfg: ModelConfig
    attend_len: int | None = None
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, cache: Cache | None = None,
                 num_valid_B: jax.Array | None = None, return_hidden: bool = False) -> Any:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        B, T = tokens_BT.shape
        V, D = cfg.padded_vocab_size, cfg.d_model
        normal = nn.initializers.normal(cfg.init_std)
        wte = _param(self, "wte", ("vocab", "embed"), (V, D), normal)
        wpe = _param(self, "wpe", (None, "embed"), (cfg.context_length, D), normal)

        if cache is None:
            index_B = None
            pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
            layer_caches = None
        else:
            index_B = cache["index"]
            num_valid_B = jnp.full((B,), T, jnp.int32) if num_valid_B is None else num_valid_B
            pos_BT = index_B[:, None] + jnp.arange(T)[None, :]
            layer_caches = cache["layers"]
        # "clip": padding rows may point past the table; their outputs are discarded.
        x = jnp.take(wte, tokens_BT, axis=0, mode="clip") + jnp.take(wpe, pos_BT, axis=0, mode="clip")
        x = constrain(x.astype(dt), ("batch", "length", "embed"))

        n_period = cfg.n_layer // cfg.period
        period_cls = BlockGroup
        # "auto" is resolved by train.py and the benchmark before they build a step; anywhere
        # else (inference, the Python API) it means none.
        if cfg.remat not in ("none", "auto"):
            period_cls = nn.remat(period_cls, policy=REMAT_POLICY_FNS[cfg.remat],
                                  prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                period_cls,
                variable_axes={"params": 0, LORA: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=n_period,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, layer_caches = stack(cfg, self.attend_len, self.lora_dropout, name="layers")(
                x, layer_caches, index_B, num_valid_B)
        else:
            # Unrolled: one cache entry per period (init_cache's layout for scan_layers=False),
            # so the decoder updates each layer's buffer in place instead of slicing a stack.
            outs = []
            for i in range(n_period):
                c = None if layer_caches is None else layer_caches[i]
                x, c = period_cls(cfg, self.attend_len, self.lora_dropout, name=f"layers_{i}")(
                    x, c, index_B, num_valid_B)
                outs.append(c)
            if layer_caches is not None:
                layer_caches = tuple(outs)

        x = LayerNorm(self.cfg, name="ln_f")(x)
        if return_hidden:
            out = x  # for losses that never materialize [B, T, V] logits
        else:
            out = logits_from_hidden(x, wte, cfg)
        if cache is None:
            return out
        return out, {"index": index_B + num_valid_B, "layers": layer_caches}


def logits_from_hidden(x_BTD: jax.Array, wte_VD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Tied output projection in fp32; the embedding's padding rows are dropped, so padded ids
    never get probability mass."""
    dt = jnp.dtype(cfg.dtype)
    logits = jnp.einsum("BTD,VD->BTV", x_BTD.astype(dt), wte_VD.astype(dt),
                        preferred_element_type=jnp.float32)
    return constrain(logits[..., : cfg.vocab_size], ("batch", "length", "vocab"))


def cast_to_compute_dtype(params: Any, cfg: ModelConfig, *, embeddings: bool = True) -> Any:
    """Floating parameters cast to the compute dtype, once per step or per decode call rather
    than at every use: under bf16 the matmuls (and FSDP gathers) read half the bytes. Gradients
    flow back through the cast to the fp32 master weights.

    embeddings=False leaves wte and wpe in the master dtype (training): the lookup then gathers
    fp32 rows, so its gradient, a scatter-add of one row per token, sums in fp32. In bf16 that
    sum stalls once it is 256 times the increment, so a frequent token loses most of its
    gradient (a test measures it). The tied output projection casts wte where it multiplies."""
    dt = jnp.dtype(cfg.dtype)
    if dt == jnp.dtype(cfg.param_dtype):
        return params
    keep = () if embeddings else ("wte", "wpe")

    def cast(path: tuple[Any, ...], a: jax.Array) -> jax.Array:
        name = getattr(path[0], "key", None) if len(path) == 1 else None
        if name in keep or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache: dense layers [B, max_len, H, K], local layers a ring of
    min(local_window, max_len) slots. "layers" holds one {"k", "v"} per attention_pattern entry;
    with scan_layers (the default) each is stacked [n_layer / period, ...] like the params, else
    "layers" is a tuple of n_layer / period such tuples, one per unrolled period."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    n_period, H, K = cfg.n_layer // cfg.period, cfg.n_head, cfg.head_dim

    def period(lead: tuple[int, ...]) -> tuple[dict[str, jax.Array], ...]:
        out = []
        for kind in cfg.attention_pattern:
            S = max_len if kind == "dense" else min(cfg.local_window, max_len)
            shape = (*lead, batch, S, H, K)
            out.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
        return tuple(out)

    layers = period((n_period,)) if cfg.scan_layers else tuple(period(()) for _ in range(n_period))
    return {"index": jnp.zeros((batch,), jnp.int32), "layers": layers}


def unstack_layers(params: Any, cfg: ModelConfig) -> Any:
    """Parameters of the scanned model (layers stacked [n_layer / period, ...]) as the unrolled
    model's (`scan_layers=False`: layers_0, layers_1, ...). Unchanged if already unrolled."""
    if not cfg.scan_layers:
        return params
    out = {k: v for k, v in params.items() if k not in ("layers", LORA)}
    for i in range(cfg.n_layer // cfg.period):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    if LORA in params:
        out[LORA] = unstack_layers(params[LORA], cfg)
    return out


def stack_layers(params: Any, cfg: ModelConfig) -> Any:
    """The inverse of unstack_layers: unrolled parameters (layers_0, layers_1, ...) of `cfg` as
    the scanned model's (layers stacked [n_layer / period, ...])."""
    n = cfg.n_layer // cfg.period
    out = {k: v for k, v in params.items() if not k.startswith("layers_") and k != LORA}
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params[f"layers_{i}"] for i in range(n)])
    if LORA in params:
        out[LORA] = stack_layers(params[LORA], cfg)
    return out


def init_params(cfg: ModelConfig, key: jax.Array, batch: int = 1) -> Any:
    """Unboxed fp32 parameters on the default device (no mesh); see sharding.py for sharded.
    One compiled program per config: a second call, or param_shapes, traces nothing."""
    return _init_params(cfg, key, batch, nn.get_logical_axis_rules())


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_params(cfg: ModelConfig, key: jax.Array, batch: int, rules: tuple) -> Any:
    # `rules`, flax's logical axis rules in force, is only a key: jit's cache knows the mesh in
    # force but not them, and the model's constraints depend on both.
    del rules
    tokens = jnp.zeros((batch, min(cfg.context_length, 8)), jnp.int32)
    return nn.unbox(GPT(cfg).init(key, tokens))["params"]


def param_shapes(cfg: ModelConfig) -> Any:
    """Parameter ShapeDtypeStructs through eval_shape: no memory, any size."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
