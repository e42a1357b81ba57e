"""Token choice and the random streams behind it: one rule for every decoder.

`generate` (sample.py) and the server's engine both call `choose_tokens` and key their rows with
`row_keys` and `step_keys`, so a completion from the server is the text sample.py gives for the
same prompt, settings and seed: by construction, not by a second implementation kept in step.

Settings are per row (arrays), so one compiled program serves a batch of rows that each have
their own; a caller whose rows share one setting passes Python numbers, which decides what to
compile at trace time (no sort of the vocabulary when nothing filters, a `top_k` of the pool
instead of a full sort when every row's top-k is bounded by `pool`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Setting = jax.Array | float | int


def row_keys(key: jax.Array, index_B: jax.Array) -> jax.Array:
    """The stream of each row: sample `index` of a request seeded with `key`. A row's tokens depend
    only on (key, index), not on its batch, its slot or its neighbours."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index_B, jnp.uint32))


def step_keys(keys_B: jax.Array, step: jax.Array | int) -> jax.Array:
    """Each row's key for its token number `step` (a scalar, or one count per row)."""
    step_B = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), keys_B.shape)
    return jax.vmap(jax.random.fold_in)(keys_B, step_B)


def _per_row(value: Setting, B: int, dtype: jnp.dtype) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(value, dtype), (B,))


def _candidates(scaled_BV: jax.Array, pool: int) -> tuple[jax.Array, jax.Array]:
    """Tokens in descending order of logit, (logits, ids) [B, N]: the top `pool` of them when
    0 < pool < V, else all. Ties keep the lower id first either way."""
    V = scaled_BV.shape[-1]
    if 0 < pool < V:
        return jax.lax.top_k(scaled_BV, pool)
    idx = jnp.argsort(-scaled_BV, axis=-1, stable=True)
    return jnp.take_along_axis(scaled_BV, idx, axis=-1), idx


def _kept(scaled_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array, pool: int,
          mask_k: bool = True, mask_p: bool = True) -> tuple[jax.Array, jax.Array]:
    """The candidates in descending order, (logits, ids) [B, N], -inf past each row's top-k
    (0: all) and past the smallest set of those whose mass reaches its top-p (the first token
    always stays). mask_k / mask_p False: known at trace time to drop nothing (a pool of
    exactly top-k; top-p 1), so not computed."""
    vals, idx = _candidates(scaled_BV, pool)
    rank = jnp.arange(vals.shape[-1])[None, :]
    if mask_k:
        vals = jnp.where((top_k_B[:, None] <= 0) | (rank < top_k_B[:, None]), vals, -jnp.inf)
    if mask_p:
        probs = jax.nn.softmax(vals.astype(jnp.float32), axis=-1)
        # The mass ahead of each token: the running sum shifted, not cumsum - probs, which can
        # differ in the last bit (and did not agree with what sample.py has always drawn).
        cum = jnp.cumsum(probs, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
        vals = jnp.where((before < top_p_B[:, None]) | (rank == 0), vals, -jnp.inf)
    return vals, idx


def filter_logits(logits_BV: jax.Array, top_k: Setting = 0, top_p: Setting = 1.0) -> jax.Array:
    """Logits with every token outside the row's top-k / top-p set at -inf (top-p applies to the
    distribution renormalized over the top-k tokens): what `choose_tokens` samples from."""
    B = logits_BV.shape[0]
    vals, idx = _kept(logits_BV, _per_row(top_k, B, jnp.int32), _per_row(top_p, B, jnp.float32),
                      pool=0)
    rows = jnp.arange(B)[:, None]
    return jnp.full_like(logits_BV, -jnp.inf).at[rows, idx].set(vals)


def _filtered(scaled_BV: jax.Array, keys_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
              pool: int, mask_k: bool = True, mask_p: bool = True) -> jax.Array:
    """A token of each row's kept set, sampled in sorted order and mapped back (nothing scatters
    over the vocabulary)."""
    vals, idx = _kept(scaled_BV, top_k_B, top_p_B, pool, mask_k, mask_p)
    # With JAX's partitionable threefry, noise for position j does not depend on the draw's
    # width: a pool of the top k samples exactly as the full sorted vocabulary would.
    j_B = jax.vmap(jax.random.categorical)(keys_B, vals)
    return jnp.take_along_axis(idx, j_B[:, None], axis=-1)[:, 0]


def choose_tokens(logits_BV: jax.Array, keys_B: jax.Array, temperature: Setting = 1.0,
                  top_k: Setting = 0, top_p: Setting = 1.0, *, pool: int = 0) -> jax.Array:
    """One token per row: argmax where temperature is 0, else from softmax(logits / T) over the
    row's top-k tokens (0: all), then over the top-p mass of those (1: all).

    Args:
      logits_BV: the model's logits at each row's last position.
      keys_B: each row's key for this token (`step_keys`).
      temperature, top_k, top_p: per row ([B] arrays), or one Python number for every row.
      pool: a bound on every row's top-k known when tracing (0: none), so the candidates come
        from `lax.top_k(pool)` rather than a sort of the whole vocabulary.
    Returns:
      int32 [B].
    """
    B, V = logits_BV.shape
    greedy_B = _per_row(temperature, B, jnp.float32) <= 0
    argmax_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    fixed = all(isinstance(v, (int, float)) for v in (temperature, top_k, top_p))
    if fixed and temperature <= 0:
        return argmax_B
    t_B = _per_row(temperature, B, jnp.float32)
    scaled = logits_BV.astype(jnp.float32) / jnp.where(greedy_B, 1.0, t_B)[:, None]
    k_B, p_B = _per_row(top_k, B, jnp.int32), _per_row(top_p, B, jnp.float32)

    def plain() -> jax.Array:
        return jax.vmap(jax.random.categorical)(keys_B, scaled).astype(jnp.int32)

    if fixed:
        if not (0 < top_k < V or top_p < 1.0):
            return plain()
        exact_k = 0 < pool == top_k < V  # the pool is the top-k set itself
        return _filtered(scaled, keys_B, k_B, p_B, pool, mask_k=not exact_k,
                         mask_p=top_p < 1.0).astype(jnp.int32)
    # A row that does not filter draws as `plain` does even beside rows that do: its token must
    # not depend on its neighbours' settings.
    filters_B = ((k_B > 0) & (k_B < V)) | (p_B < 1.0)

    def filtered() -> jax.Array:
        chosen = _filtered(scaled, keys_B, k_B, p_B, pool).astype(jnp.int32)
        return jnp.where(filters_B, chosen, plain())

    # The sort costs V log V per row: skip it when no sampled row filters.
    sampled = jax.lax.cond((~greedy_B & filters_B).any(), filtered, plain)
    return jnp.where(greedy_B, argmax_B, sampled)
