"""Sampling: one prefill call over the whole prompt, then a jitted `lax.while_loop` decoder over an
explicit KV cache.

The loop (`sample_loop`) only sees a logits function `logits_fn(tokens_B1, cache) -> (logits_BV,
cache)` and a small `SamplerState`, so tests can drive it with a fake model. `generate` and
`generate_stream` wire it to the GPT: ragged prompts are right-padded and prefilled together,
every row gets its own random stream (prompt rows sampled alone or in a batch give the same
tokens), and the batch may be sharded on a mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model, sharding
from gptjax.config import ModelConfig, check_sampling
from gptjax.errors import UserError
from gptjax.model import GPT, init_cache

__all__ = [
    "Sampling",
    "SamplerState",
    "programs",
    "filter_logits",
    "generate",
    "generate_stream",
    "init_cache",
    "init_state",
    "sample_loop",
    "sample_tokens",
]

Cache = Any
LogitsFn = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]
PAD = 0  # what the token buffer holds after a row has ended
PROMPT_BUCKET = 64


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


def _candidates(logits_BV: jax.Array, top_k: int, top_p: float) -> tuple[jax.Array, jax.Array]:
    """The kept tokens in descending order: (logits, ids) [B, K], -inf where top-p drops one."""
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        vals, idx = jax.lax.top_k(logits_BV, top_k)
    else:
        idx = jnp.argsort(-logits_BV, axis=-1, stable=True)
        vals = jnp.take_along_axis(logits_BV, idx, axis=-1)
    if top_p < 1.0:
        probs = jax.nn.softmax(vals.astype(jnp.float32), axis=-1)
        # A token is kept while the mass strictly before it is below p: the smallest set whose
        # mass reaches p. The first token always stays.
        cum = jnp.cumsum(probs, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    return vals, idx


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits with every token outside the top-k / top-p set at -inf (top-p is applied to the
    distribution renormalized over the top-k tokens). What `sample_tokens` samples from."""
    vals, idx = _candidates(logits_BV, top_k, top_p)
    rows = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.full_like(logits_BV, -jnp.inf).at[rows, idx].set(vals)


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row: argmax when greedy, else from softmax(logits / T) after top-k/top-p."""
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k == 0 and sampling.top_p >= 1.0:
        return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)
    # Sample in sorted order and map back: no scatter over the vocabulary.
    vals, idx = _candidates(logits_BV, sampling.top_k, sampling.top_p)
    j_B = jax.vmap(jax.random.categorical)(keys_B, vals)
    return jnp.take_along_axis(idx, j_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


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


def _commit(state: SamplerState, tok_B: jax.Array, sampling: Sampling) -> SamplerState:
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


def _step_keys(keys_B: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)


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
    tok_B = sample_tokens(logits_BV, _step_keys(keys_B, state.step), sampling)
    return _commit(state, tok_B, sampling)


def sample_loop(logits_fn: LogitsFn, state: SamplerState, limit: jax.Array | int, *,
                sampling: Sampling) -> SamplerState:
    """Feeds each row's last token back until `step` reaches `limit` (at most the buffer size) or
    every row has ended. Traceable; jit it with `logits_fn` closed over.

    Args:
      logits_fn: (tokens [B, 1], cache) -> (logits [B, V], cache).
      state: from `init_state` or a previous call (so decoding can go on in chunks).
      limit: stop once this many tokens have been sampled (a traced scalar is fine).
      sampling: see `Sampling`.
    Returns:
      The state after the last step.
    """
    limit = jnp.minimum(limit, state.tokens_BN.shape[1])

    def cond(s: SamplerState) -> jax.Array:
        return (s.step < limit) & ~s.done_B.all()

    def body(s: SamplerState) -> SamplerState:
        logits_BV, cache = logits_fn(s.last_B[:, None], s.cache)
        tok_B = sample_tokens(logits_BV, _step_keys(s.keys_B, s.step), sampling)
        return _commit(s.replace(cache=cache), tok_B, sampling)

    return jax.lax.while_loop(cond, body, state)


# --- the GPT behind the loop -------------------------------------------------------------------


def attend_buckets(max_len: int, smallest: int = 256) -> list[int]:
    """The cache prefixes a decode call's dense layers may read: powers of two from `smallest`
    below max_len, then max_len."""
    out = []
    L = smallest
    while L < max_len:
        out.append(L)
        L *= 2
    return [*out, max_len]


def decode_segment(step: int, end: int, longest: int, max_len: int) -> tuple[int, int]:
    """(segment end, attend_len) for decoding from `step` towards `end` when the longest row's
    prompt has `longest` tokens: the step at `s` attends positions < longest + s, so the
    segment stops where that outgrows the smallest bucket that covers its first step. A long
    generation thus crosses a few buckets (a few calls), each step reading only the cache
    prefix the text so far needs."""
    L = next(b for b in attend_buckets(max_len) if b >= longest + step)
    return min(end, L - longest + 1), L


def _model_logits_fn(cfg: ModelConfig, params: Any, attend_len: int | None = None) -> LogitsFn:
    def fn(tokens_B1: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits_B1V, cache = GPT(cfg, attend_len).apply({"params": params}, tokens_B1, cache=cache)
        return logits_B1V[:, 0], cache

    return fn


@functools.lru_cache(maxsize=32)
def programs(cfg: ModelConfig, sampling: Sampling, mesh: Any) -> tuple[Callable, Callable]:
    """(prefill, decode), jitted once per model, sampling setting and mesh.

    Both run the layers unrolled (`scan_layers=False`) on per-layer weights taken out of the
    stack once per call, and keep one KV buffer per layer: inside the token loop nothing slices
    a stacked array, and each step writes its token into each layer's cache in place."""
    stacked = cfg
    cfg = dataclasses.replace(cfg, scan_layers=False, remat="none")

    def layer_params(params: Any) -> Any:
        # One pass: the compute-dtype cast and the unstacking fuse into per-layer copies.
        return model.unstack_layers(model.cast_to_compute_dtype(params, stacked), stacked)

    def prefill(params: Any, tokens_BT: jax.Array, lengths_B: jax.Array, keys_B: jax.Array,
                active_B: jax.Array, max_len: int, max_new: int) -> SamplerState:
        params = layer_params(params)
        B = tokens_BT.shape[0]
        cache = init_cache(cfg, B, max_len)
        if mesh is not None:
            cache = jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, mesh))
        # Hidden states, not logits: [B, T, V] logits of a long batched prompt would not fit.
        x_BTD, cache = GPT(cfg).apply({"params": params}, tokens_BT, cache=cache,
                                      num_valid_B=lengths_B, return_hidden=True)
        x_B1D = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
        logits_BV = model.logits_from_hidden(x_B1D, params["wte"], cfg)[:, 0]
        return init_state(logits_BV, cache, keys_B, max_new_tokens=max_new, sampling=sampling,
                          active_B=active_B)

    def decode(params: Any, state: SamplerState, limit: jax.Array,
               attend_len: int | None = None) -> SamplerState:
        params = layer_params(params)
        return sample_loop(_model_logits_fn(cfg, params, attend_len), state, limit,
                           sampling=sampling)

    return (jax.jit(prefill, static_argnames=("max_len", "max_new")),
            jax.jit(decode, donate_argnames=("state",), static_argnames=("attend_len",)))


def _check(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           temperature: float, top_k: int, top_p: float, num_samples: int, seed: int,
           truncate_prompt: bool) -> list[list[int]]:
    """Validates the request; returns the prompts, truncated where asked."""
    check_sampling({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                    "top_p": top_p, "num_samples": num_samples, "seed": seed})
    if not prompts:
        raise UserError("no prompts given")
    ctx = cfg.context_length
    room = ctx - max_new_tokens
    if room < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {ctx} tokens")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary "
                            f"of {cfg.vocab_size}")
        if len(p) > room:
            if not truncate_prompt:
                raise UserError(
                    f"prompt of {len(p)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                    f"context length of {ctx} tokens (the prompt may have at most {room})"
                )
            p = p[-room:]
        out.append(p)
    return out


def generate_stream(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
                    eos_id: int | None = None, stop_sequences: Sequence[Sequence[int]] = (),
                    truncate_prompt: bool = False, mesh: Any = None, chunk_size: int = 16
                    ) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields as it decodes: after the prefill and after every `chunk_size`
    steps, the new tokens of each row (prompt order × num_samples; [] for rows that ended).

    The tokens are exactly those `generate` returns with the same arguments. Bad arguments raise
    UserError here, before the first token, not when iteration starts.
    """
    prompts = _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, num_samples, seed,
                     truncate_prompt)
    if chunk_size <= 0:
        raise UserError(f"chunk_size must be positive, got {chunk_size}")
    # `model.init` returns parameters boxed with their logical axis names; accept those too.
    params = flax.linen.meta.unbox(params)
    sampling = Sampling(float(temperature), int(top_k), float(top_p),
                        None if eos_id is None else int(eos_id),
                        tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s)))
    rows = [(p, s) for p in prompts for s in range(num_samples)]
    n_rows = len(rows)
    # Pad the batch to a multiple of the data-parallel devices with ended one-token rows.
    shards = 1 if mesh is None else sharding.data_parallel_size(mesh)
    B = -(-n_rows // shards) * shards
    rows += [([0], 0)] * (B - n_rows)
    # Prompt lengths rounded up to a multiple of PROMPT_BUCKET: one compile serves many lengths.
    longest = max(len(p) for p, _ in rows)
    T = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, cfg.context_length - max_new_tokens)
    tokens = np.zeros((B, T), np.int32)
    for b, (p, _) in enumerate(rows):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p, _ in rows], np.int32)
    active = np.arange(B) < n_rows
    # A row's stream depends only on (seed, sample index): a prompt sampled alone or in any
    # batch gets the same tokens.
    base = jax.random.key(seed)
    keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.array([s for _, s in rows]))

    return _stream(params, cfg, sampling, mesh, tokens, lengths, keys, active, n_rows,
                   max_new_tokens, chunk_size)


def _stream(params: Any, cfg: ModelConfig, sampling: Sampling, mesh: Any, tokens: np.ndarray,
            lengths: np.ndarray, keys: jax.Array, active: np.ndarray, n_rows: int,
            max_new_tokens: int, chunk_size: int) -> Iterator[list[list[int]]]:
    B, T = tokens.shape
    max_len, longest = T + max_new_tokens, int(np.max(lengths))  # host values, before any put
    prefill, decode = programs(cfg, sampling, mesh)
    scope: Callable[[], Any] = contextlib.nullcontext
    if mesh is not None:
        scope = functools.partial(sharding.activate, mesh)
        put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh, 1))
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        lengths, keys, active = put(lengths), put(keys), put(active)

    with scope():
        state = prefill(params, tokens, lengths, keys, active, max_len=max_len,
                        max_new=max_new_tokens)
    seen = np.zeros((B,), np.int64)
    want = 0
    while True:
        # The whole buffer (small): slicing on the device would compile a program per size.
        num, done, step, buf = jax.device_get(
            (state.num_B, state.done_B, state.step, state.tokens_BN))
        if step >= want or done.all():
            yield [buf[b, seen[b] : num[b]].tolist() for b in range(n_rows)]
            seen = num.astype(np.int64)
            if done.all() or step >= max_new_tokens:
                return
            want = min(int(step) + chunk_size, max_new_tokens)
        end, attend_len = decode_segment(int(step), want, longest, max_len)
        with scope():
            state = decode(params, state, jnp.int32(end), attend_len=attend_len)


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, num_samples: int = 1, eos_id: int | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), truncate_prompt: bool = False,
             mesh: Any = None) -> list[list[int]]:
    """Samples continuations of token prompts: one prefill, then one jitted while_loop.

    Args:
      params: the model's parameters (the training tree; sharded on `mesh` if given).
      cfg: the model's config.
      prompts: token-id lists, of any lengths (each row equals sampling that prompt alone).
      max_new_tokens: tokens to generate per row, at most.
      temperature: 0 is greedy; top_k (0: off) and top_p (1: off) combine with it.
      seed: the random stream; sample s of every prompt uses the stream (seed, s).
      num_samples: samples per prompt.
      eos_id: a row ends when it emits this id, which is left out of its result.
      stop_sequences: a row ends after emitting any of these (kept in its result).
      truncate_prompt: keep only a prompt's last tokens when it and max_new_tokens do not fit
        the context, instead of raising.
      mesh: a `jax.sharding.Mesh` to decode on (batch over data×fsdp, heads over tensor).
    Returns:
      The new tokens of every sample, in prompt order × num_samples.
    Raises:
      UserError: an empty prompt, a prompt + max_new_tokens over the context length, or bad
        sampling settings.
    """
    out: list[list[int]] | None = None
    for new in generate_stream(params, cfg, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               num_samples=num_samples, eos_id=eos_id,
                               stop_sequences=stop_sequences, truncate_prompt=truncate_prompt,
                               mesh=mesh, chunk_size=max_new_tokens):
        out = new if out is None else [a + b for a, b in zip(out, new)]
    assert out is not None
    return out
