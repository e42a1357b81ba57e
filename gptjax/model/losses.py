"""Next-token cross-entropy in fp32: over whole logits, and chunked over positions with its
gradient fused in (the [B, T, V] logits never exist at once). The train step and evaluation
both score through here."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.model.attention import NEG_INF
from gptjax.config import ModelConfig
from gptjax.model import GPT, cast_to_compute_dtype, constrain, variables


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood of the targets, fp32 [B, T]."""
    logits = logits_BTV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                  mask_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy in fp32 over the tokens where mask is nonzero.

    Returns (mean loss, number of tokens counted)."""
    nll = token_nll(logits_BTV, targets_BT)
    if mask_BT is None:
        mask_BT = jnp.ones_like(nll)
    mask_BT = mask_BT.astype(jnp.float32)
    count = mask_BT.sum()
    return (nll * mask_BT).sum() / jnp.maximum(count, 1.0), count


def chunked_cross_entropy(x_BTD: jax.Array, wte_VD: jax.Array, targets_BT: jax.Array,
                          mask_BT: jax.Array | None, cfg: ModelConfig, chunk: int
                          ) -> tuple[jax.Array, jax.Array]:
    """Like cross_entropy(logits_from_hidden(x), ...) but `chunk` positions at a time, so the
    [B, T, V] fp32 logits never exist at once, and fused with its own gradient: under
    differentiation each chunk's forward pass also forms d loss / d logits (softmax − one-hot)
    and contracts it straight into the gradients of x and of the tied embedding, so the backward
    pass has nothing to recompute (3 vocabulary matmuls per chunk, as unchunked autodiff does,
    where rematerializing a chunk would take 4).

    Returns (sum of token losses, number of tokens counted)."""
    B, T, D = x_BTD.shape
    if mask_BT is None:
        mask_BT = jnp.ones((B, T), jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    chunk = min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:  # padded positions carry mask 0
        x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))

    def split(a: jax.Array) -> jax.Array:  # [B, n·c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)

    total = _fused_ce(split(x_BTD), wte_VD, split(targets_BT), split(mask_BT),
                      cfg.vocab_size, cfg.dtype)
    return total, mask_BT.sum()


def _chunk_nll(x_BcD: jax.Array, w_VD: jax.Array, t_Bc: jax.Array, vocab: int, dtype: str
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token losses [B, c], logits [B, c, V] fp32, their logsumexp [B, c]) of one chunk. The
    embedding's padding rows get a logit of -huge, so they carry no probability."""
    dt = jnp.dtype(dtype)
    logits = jnp.einsum("BcD,VD->BcV", x_BcD.astype(dt), w_VD.astype(dt),
                        preferred_element_type=jnp.float32)
    if vocab < w_VD.shape[0]:
        logits = jnp.where(jnp.arange(w_VD.shape[0]) < vocab, logits, NEG_INF)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
    return lse - picked, logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_ce(x_NBcD: jax.Array, w_VD: jax.Array, t_NBc: jax.Array, m_NBc: jax.Array,
              vocab: int, dtype: str) -> jax.Array:
    """Σ mask · nll over chunks [N, B, c]; without differentiation, the loss alone."""

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        x, t, m = xs
        return total + (_chunk_nll(x, w_VD, t, vocab, dtype)[0] * m).sum(), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_NBcD, t_NBc, m_NBc))[0]


def _fused_ce_fwd(x_NBcD: jax.Array, w_VD: jax.Array, t_NBc: jax.Array, m_NBc: jax.Array,
                  vocab: int, dtype: str) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    dt = jnp.dtype(dtype)
    w = w_VD.astype(dt)

    def body(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]
             ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        total, dw_VD = carry
        x, t, m = xs
        nll, logits, lse = _chunk_nll(x, w, t, vocab, dtype)
        # d(Σ m·nll)/d logits = m · (softmax − one-hot), in the compute dtype for the matmuls.
        g = jnp.exp(logits - lse[..., None])
        g = g - jax.nn.one_hot(t, logits.shape[-1], dtype=g.dtype)
        g = (g * m[..., None]).astype(dt)
        dx = jnp.einsum("BcV,VD->BcD", g, w, preferred_element_type=jnp.float32)
        dw_VD = dw_VD + jnp.einsum("BcV,BcD->VD", g, x.astype(dt),
                                   preferred_element_type=jnp.float32)
        # Sharded like wte, so a mesh reduces each chunk's share, not a replicated [V, D].
        dw_VD = constrain(dw_VD, ("vocab", "embed"))
        return (total + (nll * m).sum(), dw_VD), dx.astype(x.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_VD.shape, jnp.float32))
    (total, dw), dx = jax.lax.scan(body, init, (x_NBcD, t_NBc, m_NBc))
    return total, (dx, dw.astype(w_VD.dtype))


def _fused_ce_bwd(vocab: int, dtype: str, res: tuple[jax.Array, jax.Array], ct: jax.Array
                  ) -> tuple[jax.Array | None, ...]:
    dx, dw = res
    return (ct * dx).astype(dx.dtype), (ct * dw).astype(dw.dtype), None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def sum_loss(params: Any, model_cfg: ModelConfig, batch: dict[str, jax.Array], *,
             lora_dropout: float = 0.0, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, tokens counted) of one [B, T] batch of inputs, targets and an
    optional mask, through the chunked loss when model_cfg.loss_chunk asks for it.

    lora_dropout > 0 (training adapters the params carry under "lora") needs `rng`."""
    params = cast_to_compute_dtype(params, model_cfg, embeddings=False)
    model = GPT(model_cfg, lora_dropout=lora_dropout)
    rngs = {"dropout": rng} if lora_dropout > 0 else {}
    chunk = model_cfg.loss_chunk
    if chunk and chunk < batch["inputs"].shape[-1]:
        x = model.apply(variables(params), batch["inputs"], return_hidden=True, rngs=rngs)
        return chunked_cross_entropy(x, params["wte"], batch["targets"], batch.get("mask"),
                                     model_cfg, chunk)
    logits = model.apply(variables(params), batch["inputs"], rngs=rngs)
    mean, count = cross_entropy(logits, batch["targets"], batch.get("mask"))
    return mean * count, count
