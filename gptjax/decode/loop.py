"""The sampler: a model-agnostic decode loop. It only sees a logits function
`logits_fn(tokens_B1, cache) -> (logits_BV, cache)` and a small `SamplerState`, so tests can drive
it with a fake model; generate.py wires it to the GPT."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.decode.choose import choose_tokens, step_keys

__all__ = [
    "Sampling",
    "SamplerState",
    "init_state",
    "sample_loop",
    "sample_tokens",
]

Cache = Any
LogitsFn = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]
PAD = 0  # what the token buffer holds after a row has ended


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are chosen and when a row ends. Hashable: it is a static argument of the jitted
    programs, so each distinct setting compiles once.

    temperature 0 means greedy (top_k and top_p are then ignored); top_k 0 and top_p 1 disable
    those filters. A row ends after `eos_id` (which is not returned) or after any of
    `stop_sequences` (which is returned: streamed tokens are never taken back)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@flax.struct.dataclass
class SamplerState:
    """The decode loop's carry. Row b's output is tokens_BN[b, :num_B[b]]."""

    tokens_BN: jax.Array  # int32 [B, max_new]: sampled tokens, PAD once a row has ended
    last_B: jax.Array  # int32 [B]: the latest sampled token, fed to the next step
    num_B: jax.Array  # int32 [B]: tokens each row keeps
    done_B: jax.Array  # bool [B]
    recent_BM: jax.Array  # int32 [B, M]: the last M tokens, to match stop sequences
    step: jax.Array  # int32 []: tokens sampled so far (every row advances together)
    keys_B: jax.Array  # typed PRNG keys [B], one stream per row
    cache: Cache


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row with one setting for all (`choose.choose_tokens`, the server's rule)."""
    top_k = sampling.top_k if 0 < sampling.top_k < logits_BV.shape[-1] else 0
    return choose_tokens(logits_BV, keys_B, sampling.temperature, sampling.top_k,
                         sampling.top_p, pool=top_k)


def _stop_table(sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences left-padded to M: (ids [S, M], used [S, M])."""
    seqs = [s for s in sampling.stop_sequences if s]
    M = max((len(s) for s in seqs), default=1)
    ids = np.zeros((len(seqs), M), np.int32)
    used = np.zeros((len(seqs), M), bool)
    for i, s in enumerate(seqs):
        ids[i, M - len(s):] = s
        used[i, M - len(s):] = True
    return ids, used


def commit_tokens(state: SamplerState, tok_B: jax.Array, sampling: Sampling) -> SamplerState:
    """Records the tokens just sampled at column `step` and marks the rows that end with them."""
    ended_B = jnp.zeros_like(state.done_B)
    if sampling.eos_id is not None:
        ended_B = tok_B == sampling.eos_id
    keep_B = ~state.done_B & ~ended_B
    recent = state.recent_BM
    if sampling.stop_sequences:
        recent = jnp.concatenate([recent[:, 1:], tok_B[:, None]], axis=1)
        ids_SM, used_SM = _stop_table(sampling)
        hit_BSM = (recent[:, None, :] == ids_SM[None]) | ~used_SM[None]
        stopped = hit_BSM.all(-1).any(-1) & keep_B
        ended_B = ended_B | stopped
    tokens = state.tokens_BN.at[:, state.step].set(jnp.where(keep_B, tok_B, PAD))
    return state.replace(
        tokens_BN=tokens,
        last_B=tok_B,
        num_B=state.num_B + keep_B.astype(jnp.int32),
        done_B=state.done_B | ended_B,
        recent_BM=recent,
        step=state.step + 1,
    )


def init_state(logits_BV: jax.Array, cache: Cache, keys_B: jax.Array, *, max_new_tokens: int,
               sampling: Sampling, active_B: jax.Array | None = None) -> SamplerState:
    """The state after sampling the first token from the prefill's last-position logits.

    Args:
      logits_BV: logits at each row's last prompt token.
      cache: whatever the logits function carries (the KV cache after prefill).
      keys_B: one typed PRNG key per row.
      max_new_tokens: size of the token buffer; the loop never runs past it.
      sampling: see `Sampling`.
      active_B: bool [B]; False rows (batch padding) are ended from the start.
    Returns:
      A `SamplerState` with step 1.
    """
    B = logits_BV.shape[0]
    M = _stop_table(sampling)[0].shape[1]
    done = jnp.zeros((B,), bool) if active_B is None else ~active_B
    state = SamplerState(
        tokens_BN=jnp.full((B, max_new_tokens), PAD, jnp.int32),
        last_B=jnp.zeros((B,), jnp.int32),
        num_B=jnp.zeros((B,), jnp.int32),
        done_B=done,
        recent_BM=jnp.full((B, M), -1, jnp.int32),  # -1 matches no token: prompts never stop
        step=jnp.zeros((), jnp.int32),
        keys_B=keys_B,
        cache=cache,
    )
    tok_B = sample_tokens(logits_BV, step_keys(keys_B, state.step), sampling)
    return commit_tokens(state, tok_B, sampling)


def sample_loop(logits_fn: LogitsFn, state: SamplerState, limit: jax.Array | int, *,
                sampling: Sampling, unroll: int = 1) -> SamplerState:
    """Feeds each row's last token back until `step` reaches `limit` (at most the buffer size) or
    every row has ended. Traceable; jit it with `logits_fn` closed over.

    Args:
      logits_fn: (tokens [B, 1], cache) -> (logits [B, V], cache).
      state: from `init_state` or a previous call (so decoding can go on in chunks).
      limit: stop once this many tokens have been sampled (a traced scalar is fine).
      sampling: see `Sampling`.
      unroll: steps per iteration of the device loop while `unroll` more fit under `limit`
        (then one at a time): an accelerator reads the loop's condition back once per
        iteration, so fewer, longer iterations wait on the host less. The tokens are the same
        for any value; only `step` may pass where every row ended, by less than `unroll`.
    Returns:
      The state after the last step.
    """
    limit = jnp.minimum(limit, state.tokens_BN.shape[1])

    def step(s: SamplerState) -> SamplerState:
        logits_BV, cache = logits_fn(s.last_B[:, None], s.cache)
        tok_B = sample_tokens(logits_BV, step_keys(s.keys_B, s.step), sampling)
        return commit_tokens(s.replace(cache=cache), tok_B, sampling)

    def room(k: int) -> Callable[[SamplerState], jax.Array]:
        return lambda s: (s.step + k <= limit) & ~s.done_B.all()

    def steps(s: SamplerState) -> SamplerState:
        for _ in range(unroll):
            s = step(s)
        return s

    if unroll > 1:
        state = jax.lax.while_loop(room(unroll), steps, state)
    return jax.lax.while_loop(room(1), step, state)
