"""Causal self-attention kernels: cuDNN flash on GPU, splash on TPU (splash.py), banded O(T·w)
for local layers, a reference.

All functions take q, k, v as [B, T, H, K] in the compute dtype and return [B, T, H, K] in that
dtype. Logits and softmax are always float32. `window` is the band width of a local layer: query
t sees keys t - window < s <= t (itself included); `None` means dense causal attention.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import warn
from gptjax.model.splash import splash_attention, target_platform

# The most negative fp32 rather than -inf: a row with every key masked then gets finite
# (uniform) weights instead of NaN, and padded vocabulary rows get no probability.
NEG_INF = float(np.finfo(np.float32).min)


def masked_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                     mask_BTS: jax.Array) -> jax.Array:
    """Plain softmax attention under an explicit boolean mask (True = may attend)."""
    scale = 1.0 / math.sqrt(q_BTHK.shape[-1])
    logits_BHTS = jnp.einsum(
        "BTHK,BSHK->BHTS", q_BTHK, k_BSHK, preferred_element_type=jnp.float32
    ) * scale
    logits_BHTS = jnp.where(mask_BTS[:, None], logits_BHTS, NEG_INF)
    probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(v_BSHK.dtype)
    return jnp.einsum("BHTS,BSHK->BTHK", probs_BHTS, v_BSHK)


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[..., T, S] mask from query and key positions ([..., T] and [..., S])."""
    q = q_pos[..., :, None]
    k = k_pos[..., None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def reference_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array,
                        window: int | None = None) -> jax.Array:
    """The obviously-correct O(T²) version, for tests: a full causal (and band) mask."""
    T = q_BTHK.shape[1]
    pos = jnp.arange(T)
    mask_TS = causal_mask(pos, pos, window)
    return masked_attention(q_BTHK, k_BTHK, v_BTHK, jnp.broadcast_to(mask_TS, (q_BTHK.shape[0], T, T)))


def banded_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, window: int,
                     block: int | None = None) -> jax.Array:
    """Local causal attention in O(T·w): blocks of `block` ≥ window queries each attend to their
    own block of keys and the one before it, which together hold every key in their band."""
    B, T, H, K = q_BTHK.shape
    # Tiny windows would make tiny blocks (poor vectorization); any block >= window is correct.
    b = block or max(window, 32)
    if b < window:
        raise ValueError(f"block {b} is smaller than the window {window}")
    if b >= T:
        return reference_attention(q_BTHK, k_BTHK, v_BTHK, window)
    n = -(-T // b)
    pad = n * b - T

    def blocks(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, n, b, H, K)

    q_BNtHK, k_BNtHK, v_BNtHK = blocks(q_BTHK), blocks(k_BTHK), blocks(v_BTHK)

    def with_previous(x: jax.Array) -> jax.Array:
        prev = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
        return jnp.concatenate([prev, x], axis=2)  # [B, n, 2b, H, K]

    k_BNsHK, v_BNsHK = with_previous(k_BNtHK), with_previous(v_BNtHK)
    # Positions relative to the start of the query block: queries 0..b-1, keys -b..b-1.
    t = np.arange(b)[:, None]
    s = np.arange(2 * b)[None, :] - b
    band_ts = (s <= t) & (s > t - window)
    first_ts = band_ts & (s >= 0)  # block 0 has no previous block
    mask_Nts = np.broadcast_to(band_ts, (n, b, 2 * b)).copy()
    mask_Nts[0] = first_ts
    scale = 1.0 / math.sqrt(K)
    logits = jnp.einsum(
        "BNtHK,BNsHK->BNHts", q_BNtHK, k_BNsHK, preferred_element_type=jnp.float32
    ) * scale
    logits = jnp.where(jnp.asarray(mask_Nts)[None, :, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BTHK.dtype)
    o_BNtHK = jnp.einsum("BNHts,BNsHK->BNtHK", probs, v_BNsHK)
    return o_BNtHK.reshape(B, n * b, H, K)[:, :T]


def use_cudnn(impl: str, dtype: jnp.dtype) -> bool:
    if impl == "cudnn":
        return True
    return (
        impl == "auto"
        and target_platform() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def use_splash(impl: str) -> bool:
    return impl == "splash" or (impl == "auto" and target_platform() == "tpu")


def causal_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, *,
                     window: int | None, impl: str = "auto") -> jax.Array:
    """Full-sequence causal attention (training and scoring), positions 0..T-1.

    impl: "auto" (cuDNN flash on GPU in bf16/fp16, splash on TPU, else "xla"), "cudnn", "splash"
    (Pallas splash; interpret mode off TPU, for tests), "xla" (dense einsum for dense layers, the
    banded kernel for local ones) or "reference".
    """
    T = q_BTHK.shape[1]
    if window is not None and window >= T:
        window = None  # the band covers the whole causal triangle
    if impl == "reference":
        return reference_attention(q_BTHK, k_BTHK, v_BTHK, window)
    if use_splash(impl):
        return splash_attention(q_BTHK, k_BTHK, v_BTHK, window)
    if use_cudnn(impl, q_BTHK.dtype):
        return jax.nn.dot_product_attention(
            q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation="cudnn",
            local_window_size=None if window is None else (window - 1, 0),
        )
    if window is None:
        return reference_attention(q_BTHK, k_BTHK, v_BTHK, None)
    return banded_attention(q_BTHK, k_BTHK, v_BTHK, window)


def gpu_backend() -> bool:
    return jax.default_backend() == "gpu"


def step_kernel(impl: str, dtype: Any) -> str:
    """The kernel the decoder's step runs for model.decode_attention_impl=`impl`: "cudnn" where
    cuDNN can run it (a GPU, bf16 or fp16 compute), else "xla", with a warning when cudnn was
    asked for. The setting is saved with a run, so a run trained on a GPU still samples on a
    CPU."""
    if impl != "cudnn":
        return "xla"
    if not gpu_backend():
        why = f"no GPU here (backend {jax.default_backend()})"
    elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        why = f"model.dtype is {jnp.dtype(dtype).name}, and cuDNN takes bfloat16 or float16"
    else:
        return "cudnn"
    warn(f"model.decode_attention_impl=cudnn: {why}; decoding with xla")
    return "xla"


def step_attention(q_B1HK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                   kv_len_B: jax.Array, impl: str) -> jax.Array:
    """The decoder's step: one query per row against the first kv_len_B[b] cache slots (a
    length past the cache means all of it: rows whose output the caller discards get there).

    impl "xla": our masked einsum. "cudnn": cuDNN's fused attention under a padding mask, through
    jax.nn.dot_product_attention: one kernel that reads the cache once, where XLA runs a matmul,
    the mask and softmax, and a second matmul.
    """
    k_BSHK, v_BSHK = k_BSHK.astype(q_B1HK.dtype), v_BSHK.astype(q_B1HK.dtype)
    kv_len_B = jnp.minimum(kv_len_B, k_BSHK.shape[1]).astype(jnp.int32)
    if impl == "xla":
        mask_B1S = (jnp.arange(k_BSHK.shape[1])[None, :] < kv_len_B[:, None])[:, None, :]
        return masked_attention(q_B1HK, k_BSHK, v_BSHK, mask_B1S)
    if impl != "cudnn":
        raise ValueError(f"step attention: unknown kernel {impl!r}")
    return jax.nn.dot_product_attention(q_B1HK, k_BSHK, v_BSHK, key_value_seq_lengths=kv_len_B,
                                        implementation="cudnn")


def cached_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array,
                     cache: dict[str, jax.Array], index_B: jax.Array,
                     num_valid_B: jax.Array, window: int | None, *,
                     attend_len: int | None = None, step_impl: str = "xla"
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Attention for tokens at positions index_B + 0..T-1 against a KV cache, which it updates.

    Dense layers (window None) keep every position: cache k/v are [B, max_len, H, K]. Local
    layers keep a ring buffer of R = cache length slots, slot = position mod R, so their memory
    does not grow with the context. Only the first num_valid_B tokens of each row are committed
    (ragged prompts); the rest are padding whose outputs the caller ignores. attend_len: dense
    layers read only cache positions [0, attend_len), which the caller guarantees cover
    index_B + T (the sampler picks it from a few buckets). step_impl: the kernel of the
    one-token step (see step_attention); a longer chunk (a prompt) always uses our masked einsum.
    """
    B, T = q_BTHK.shape[:2]
    q_pos_BT = index_B[:, None] + jnp.arange(T)[None, :]
    ck, cv = cache["k"], cache["v"]
    if window is None:
        # Writing padding too is harmless: those positions are rewritten before any query sees them.
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (i, 0, 0)))
        ck, cv = write(ck, k_BTHK, index_B), write(cv, v_BTHK, index_B)
        S = min(attend_len or ck.shape[1], ck.shape[1])
        if T == 1:
            # Positions 0..index hold keys; the rest is empty or a discarded future. cuDNN gets
            # the whole cache (its lengths stop it there; a custom call's operand would be a
            # copy of the bucket's slice), the einsum the bucket.
            n = ck.shape[1] if step_impl == "cudnn" else S
            out = step_attention(q_BTHK, ck[:, :n], cv[:, :n], index_B + 1, step_impl)
            return out, {"k": ck, "v": cv}
        k_pos_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        mask = causal_mask(q_pos_BT, k_pos_BS, None)
        out = masked_attention(q_BTHK, ck[:, :S].astype(q_BTHK.dtype),
                               cv[:, :S].astype(q_BTHK.dtype), mask)
        return out, {"k": ck, "v": cv}

    R = ck.shape[1]
    slots = jnp.arange(R)[None, :]
    if T == 1 and R <= window:
        # One token (the decoder's step): write it into its slot first, in place, then attend
        # over the ring, which now holds exactly the band (R ≤ window positions up to this one).
        rows, slot_B = jnp.arange(B), index_B % R
        commit_B = (num_valid_B > 0)[:, None, None]

        def put(c: jax.Array, x: jax.Array) -> jax.Array:
            new = jnp.where(commit_B, x[:, 0].astype(c.dtype), c[rows, slot_B])
            return c.at[rows, slot_B].set(new)

        ck, cv = put(ck, k_BTHK), put(cv, v_BTHK)
        # The ring fills slot by slot from position 0, so the slots written so far (all of them
        # in the band by construction) are the first min(index + 1, R).
        out = step_attention(q_BTHK, ck, cv, jnp.minimum(index_B + 1, R), step_impl)
        return out, {"k": ck, "v": cv}

    last_B1 = (index_B - 1)[:, None]
    # The position each slot holds before this call; negative means never written.
    old_pos_BR = last_B1 - jnp.mod(last_B1 - slots, R)
    keys = jnp.concatenate([ck.astype(k_BTHK.dtype), k_BTHK], axis=1)
    vals = jnp.concatenate([cv.astype(v_BTHK.dtype), v_BTHK], axis=1)
    k_pos = jnp.concatenate([old_pos_BR, q_pos_BT], axis=1)
    valid = jnp.concatenate([old_pos_BR >= 0, jnp.ones((B, T), bool)], axis=1)
    mask = causal_mask(q_pos_BT, k_pos, window) & valid[:, None, :]
    out = masked_attention(q_BTHK, keys, vals, mask)
    # New ring: each slot takes the newest committed position that maps to it, if any.
    end_B1 = (index_B + num_valid_B)[:, None]
    new_pos_BR = (end_B1 - 1) - jnp.mod(end_B1 - 1 - slots, R)
    fresh_BR = new_pos_BR >= index_B[:, None]
    src_BR = jnp.clip(new_pos_BR - index_B[:, None], 0, T - 1)

    def update(c: jax.Array, x: jax.Array) -> jax.Array:
        taken = jnp.take_along_axis(x, src_BR[:, :, None, None], axis=1).astype(c.dtype)
        return jnp.where(fresh_BR[:, :, None, None], taken, c)

    return out, {"k": update(ck, k_BTHK), "v": update(cv, v_BTHK)}
