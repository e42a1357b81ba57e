"""Sampling from the GPT: one prefill call over the whole prompt, then a jitted `lax.while_loop`
decoder (loop.py) over an explicit KV cache, sliding the window past the context.

`generate` and `generate_stream` wire the loop to the GPT: ragged prompts are right-padded and
prefilled together, every row gets its own random stream (prompt rows sampled alone or in a batch
give the same tokens), and the batch may be sharded on a mesh. A row whose text outgrows the
context keeps its last `kept_tokens(context)` tokens and prefills them again (`slide`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model, sharding
from gptjax.model import attention
from gptjax.config import ModelConfig, check_sampling
from gptjax.errors import UserError
from gptjax.model import GPT, init_cache, variables
from gptjax.decode.choose import filter_logits, row_keys, step_keys
from gptjax.decode.loop import (
    PAD,
    Cache,
    LogitsFn,
    SamplerState,
    Sampling,
    commit_tokens,
    init_state,
    sample_loop,
    sample_tokens,
)

__all__ = [
    "PAD",
    "Sampling",
    "SamplerState",
    "programs",
    "filter_logits",
    "generate",
    "generate_stream",
    "generate_tokens",
    "init_cache",
    "init_state",
    "kept_tokens",
    "sample_loop",
    "sample_tokens",
]

PROMPT_BUCKET = 64

# Decode steps per iteration of the device loop. 1 until a GPU measures more (bench decode
# --unroll; gptjax/bench/gpu.sh times 1 and 8): on CPU the loop's overhead is small beside a step.
DECODE_UNROLL = 1


def attend_buckets(max_len: int, smallest: int = 256) -> list[int]:
    """The cache prefixes a decode call's dense layers may read: powers of two from `smallest`
    below max_len, then max_len."""
    out = []
    L = smallest
    while L < max_len:
        out.append(L)
        L *= 2
    return [*out, max_len]


def kept_tokens(context_length: int) -> int:
    """Tokens a row keeps when its text outgrows the context: the last half. The model then
    always sees at least half its context, and a slide (a prefill of the kept tokens, O(context)
    work, done in parallel) comes once every context + 1 - kept new tokens, so it costs about
    one prefilled token per generated token."""
    return max(1, context_length // 2)


def window_start(n: int, context_length: int) -> int:
    """Where the window the model sees begins when a row's text (prompt + new tokens) has `n`
    tokens and the next one is to be predicted: 0 while the text fits; once it would hold
    context + 1 tokens, it keeps its last `kept` and grows again, so it slides every
    context + 1 - kept tokens. The rule `generate` follows, for references that recompute it
    naively."""
    if n <= context_length:
        return 0
    keep = kept_tokens(context_length)
    return n - keep - (n - context_length - 1) % (context_length + 1 - keep)


def decode_segment(step: int, end: int, longest: int, max_len: int) -> tuple[int, int]:
    """(segment end, attend_len) for decoding from `step` towards `end` when the step at `s`
    attends positions < longest + s (longest: the furthest row's window length at step 0's
    reckoning), so the segment stops where that outgrows the smallest bucket that covers its
    first step. A long generation thus crosses a few buckets (a few calls), each step reading
    only the cache prefix the text so far needs."""
    L = next(b for b in attend_buckets(max_len) if b >= longest + step)
    return min(end, L - longest + 1), L


def _model_logits_fn(cfg: ModelConfig, params: Any, attend_len: int | None = None) -> LogitsFn:
    def fn(tokens_B1: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits_B1V, cache = GPT(cfg, attend_len).apply(variables(params), tokens_B1, cache=cache)
        return logits_B1V[:, 0], cache

    return fn


def _prefill_logits(cfg: ModelConfig, params: Any, tokens_BT: jax.Array, lengths_B: jax.Array,
                    max_len: int, mesh: Any) -> tuple[jax.Array, Cache]:
    """Logits at each row's last valid token, and a fresh cache holding the rows' tokens."""
    cache = init_cache(cfg, tokens_BT.shape[0], max_len)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, mesh))
    # Hidden states, not logits: [B, T, V] logits of a long batched prompt would not fit.
    x_BTD, cache = GPT(cfg).apply(variables(params), tokens_BT, cache=cache,
                                  num_valid_B=lengths_B, return_hidden=True)
    x_B1D = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
    return model.logits_from_hidden(x_B1D, params["wte"], cfg)[:, 0], cache


def _layer_params(params: Any, cfg: ModelConfig) -> Any:
    """Per-layer weights in the compute dtype (`cfg` as trained). One pass: the cast and the
    unstacking fuse into per-layer copies, made once per call, not per token."""
    return model.unstack_layers(model.cast_to_compute_dtype(params, cfg), cfg)


def generate_tokens(params: Any, cfg: ModelConfig, tokens_BT: jax.Array, lengths_B: jax.Array,
                    key: jax.Array, *, max_new_tokens: int, sampling: Sampling = Sampling(),
                    sample_index_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The jittable core of `generate`, for a text that stays within the context: one prefill,
    then one `lax.while_loop` (`sample_loop`) over the KV cache. Pure: jit it with `cfg`,
    `max_new_tokens` and `sampling` static (`jax.jit(generate_tokens, static_argnames=("cfg",
    "max_new_tokens", "sampling"))`).

    Args:
      params: the model's parameters (plain or boxed, as `GPT.init` returns them).
      cfg: the model's config.
      tokens_BT: int32 prompts, right-padded; row b's prompt is tokens_BT[b, :lengths_B[b]].
      lengths_B: int32 prompt lengths, each at least 1.
      key: a JAX PRNG key; row b draws from `fold_in(key, sample_index_B[b])` (default 0 for
        every row: what `generate(..., key=key)` gives each prompt's first sample).
      max_new_tokens: tokens to sample per row; T + max_new_tokens must fit the context.
      sampling: temperature, top-k, top-p, end-of-text id and stop sequences.
      sample_index_B: each row's sample number, for several samples of one prompt.
    Returns:
      (tokens [B, max_new_tokens] int32, PAD after a row has ended; kept counts [B] int32).
    """
    B, T = tokens_BT.shape
    if T + max_new_tokens > cfg.context_length:
        raise UserError(f"{T} prompt positions + {max_new_tokens} new tokens exceed the context "
                        f"of {cfg.context_length}; `generate` slides past it")
    layers = _layer_params(flax.linen.meta.unbox(params), cfg)
    run = decode_config(cfg)
    index_B = jnp.zeros((B,), jnp.uint32) if sample_index_B is None else sample_index_B
    keys_B = row_keys(_base_key(0, key), index_B)
    logits_BV, cache = _prefill_logits(run, layers, tokens_BT, lengths_B, T + max_new_tokens,
                                       mesh=None)
    state = init_state(logits_BV, cache, keys_B, max_new_tokens=max_new_tokens,
                       sampling=sampling)
    state = sample_loop(_model_logits_fn(run, layers), state, max_new_tokens, sampling=sampling)
    return state.tokens_BN, state.num_B


def decode_config(cfg: ModelConfig) -> ModelConfig:
    """The model as the decoder runs it: layers unrolled, no remat, and the one-token step's
    kernel that can run here (attention.step_kernel)."""
    return dataclasses.replace(cfg, scan_layers=False, remat="none", decode_attention_impl=(
        attention.step_kernel(cfg.decode_attention_impl, cfg.dtype)))


@functools.lru_cache(maxsize=32)
def programs(cfg: ModelConfig, sampling: Sampling, mesh: Any,
             unroll: int | None = None) -> tuple[Callable, ...]:
    """(prefill, decode, slide), jitted once per model, sampling setting and mesh; decode runs
    `unroll` steps (default DECODE_UNROLL) per iteration of its loop (`sampler.sample_loop`).

    All run the layers unrolled (`scan_layers=False`) on per-layer weights taken out of the
    stack once per call, and keep one KV buffer per layer: inside the token loop nothing slices
    a stacked array, and each step writes its token into each layer's cache in place."""
    stacked, unroll = cfg, unroll or DECODE_UNROLL
    cfg = decode_config(cfg)
    layer_params = functools.partial(_layer_params, cfg=stacked)

    def prefill(params: Any, tokens_BT: jax.Array, lengths_B: jax.Array, keys_B: jax.Array,
                active_B: jax.Array, max_len: int, max_new: int) -> SamplerState:
        logits_BV, cache = _prefill_logits(cfg, layer_params(params), tokens_BT, lengths_B,
                                           max_len, mesh)
        return init_state(logits_BV, cache, keys_B, max_new_tokens=max_new, sampling=sampling,
                          active_B=active_B)

    def decode(params: Any, state: SamplerState, limit: jax.Array,
               attend_len: int | None = None) -> SamplerState:
        params = layer_params(params)
        return sample_loop(_model_logits_fn(cfg, params, attend_len), state, limit,
                           sampling=sampling, unroll=unroll)

    def slide(params: Any, state: SamplerState, window_BK: jax.Array, slide_B: jax.Array,
              max_len: int) -> SamplerState:
        """One step: rows in slide_B prefill their kept window into a fresh cache, the others
        decode as usual (so a row's tokens do not depend on its batch); both are computed and
        each row takes its own."""
        params = layer_params(params)
        B, K = window_BK.shape
        lengths_B = jnp.full((B,), K, jnp.int32)
        slid_BV, fresh = _prefill_logits(cfg, params, window_BK, lengths_B, max_len, mesh)
        # Sliding rows' caches are full: this step's write for them is clamped and discarded.
        kept_BV, cache = _model_logits_fn(cfg, params)(state.last_B[:, None], state.cache)

        def pick(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(slide_B.reshape((B,) + (1,) * (new.ndim - 1)), new, old)

        logits_BV = pick(slid_BV, kept_BV)
        tok_B = sample_tokens(logits_BV, step_keys(state.keys_B, state.step), sampling)
        return commit_tokens(state.replace(cache=jax.tree.map(pick, fresh, cache)), tok_B,
                             sampling)

    return (jax.jit(prefill, static_argnames=("max_len", "max_new")),
            jax.jit(decode, donate_argnames=("state",), static_argnames=("attend_len",)),
            jax.jit(slide, donate_argnames=("state",), static_argnames=("max_len",)))


def _check(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           temperature: float, top_k: int, top_p: float, num_samples: int, seed: int,
           truncate_prompt: bool) -> list[list[int]]:
    """Validates the request; returns the prompts, truncated where asked."""
    check_sampling({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                    "top_p": top_p, "num_samples": num_samples, "seed": seed})
    if not prompts:
        raise UserError("no prompts given")
    ctx = cfg.context_length
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary "
                            f"of {cfg.vocab_size}")
        # New tokens slide the window (see kept_tokens); the prompt itself must fit.
        if len(p) > ctx:
            if not truncate_prompt:
                raise UserError(f"prompt of {len(p)} tokens exceeds the context length of "
                                f"{ctx} tokens")
            p = p[-ctx:]
        out.append(p)
    return out


def generate_stream(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, key: jax.Array | None = None,
                    num_samples: int = 1, eos_id: int | None = None,
                    stop_sequences: Sequence[Sequence[int]] = (), truncate_prompt: bool = False,
                    mesh: Any = None, chunk_size: int = 16) -> Iterator[list[list[int]]]:
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
    T = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, cfg.context_length)
    tokens = np.zeros((B, T), np.int32)
    for b, (p, _) in enumerate(rows):
        tokens[b, : len(p)] = p
    active = np.arange(B) < n_rows
    # A row's stream depends only on (seed or key, sample index): a prompt sampled alone or in
    # any batch gets the same tokens.
    keys = row_keys(_base_key(seed, key), np.array([s for _, s in rows]))
    job = _Job(cfg, sampling, mesh, [p for p, _ in rows], n_rows, max_new_tokens, chunk_size)
    return job.stream(params, tokens, keys, active)


@dataclasses.dataclass
class _Job:
    """One generation's host side: when to decode, when to slide, what to yield."""

    cfg: ModelConfig
    sampling: Sampling
    mesh: Any
    prompts: list[list[int]]  # per batch row, padding rows included
    n_rows: int
    max_new_tokens: int
    chunk_size: int

    def put(self, x: Any, ndim: int) -> Any:
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding.batch_sharding(self.mesh, ndim))

    def stream(self, params: Any, tokens: np.ndarray, keys: jax.Array,
               active: np.ndarray) -> Iterator[list[list[int]]]:
        B, T = tokens.shape
        ctx, new = self.cfg.context_length, self.max_new_tokens
        max_len = min(T + new, ctx)  # no row's cache outgrows this: slides keep it in bounds
        lengths = np.array([len(p) for p in self.prompts], np.int32)
        prefill, decode, slide = programs(self.cfg, self.sampling, self.mesh)
        scope: Callable[[], Any] = contextlib.nullcontext
        if self.mesh is not None:
            scope = functools.partial(sharding.activate, self.mesh)
        # Row b's decode step at `s` feeds the token at cache position base[b] + s.
        base = lengths.astype(np.int64) - 1
        with scope():
            state = prefill(params, self.put(tokens, 2), self.put(lengths, 1),
                            self.put(keys, 1), self.put(active, 1), max_len=max_len,
                            max_new=new)
        seen, want = np.zeros((B,), np.int64), 0
        while True:
            # The whole buffer (small): slicing on the device would compile a program per size.
            num, done, step, buf = jax.device_get(
                (state.num_B, state.done_B, state.step, state.tokens_BN))
            step = int(step)
            if step >= want or done.all():
                yield [buf[b, seen[b] : num[b]].tolist() for b in range(self.n_rows)]
                seen = num.astype(np.int64)
                if done.all() or step >= new:
                    return
                want = min(step + self.chunk_size, new)
            full = max_len - base  # the step at which each row's cache is full
            slide_B = ~done & (full == step)
            with scope():
                if slide_B.any():
                    window = self.windows(buf, step, kept_tokens(ctx))
                    state = slide(params, state, self.put(window, 2), self.put(slide_B, 1),
                                  max_len=max_len)
                    base[slide_B] = kept_tokens(ctx) - step - 1
                    continue
                end = min(want, int(full[~done].min()))
                end, attend_len = decode_segment(step, end, int(base[~done].max()) + 1, max_len)
                state = decode(params, state, jnp.int32(end), attend_len=attend_len)

    def windows(self, buf: np.ndarray, step: int, keep: int) -> np.ndarray:
        """Each row's last `keep` tokens of prompt + new tokens, [B, keep] (rows that do not
        slide get whatever: their result is not taken)."""
        out = np.zeros((len(self.prompts), keep), np.int32)
        for b, p in enumerate(self.prompts):
            text = [*p, *buf[b, :step].tolist()]
            out[b, -min(keep, len(text)):] = text[-keep:]
        return out


def _base_key(seed: int, key: jax.Array | None) -> jax.Array:
    """The request's key: `key` when given (typed, or raw uint32 [2] data), else key(seed)."""
    if key is None:
        return jax.random.key(seed)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape != ():
        raise UserError(f"key must be a single PRNG key, got shape {key.shape}")
    return key


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, key: jax.Array | None = None, num_samples: int = 1,
             eos_id: int | None = None, stop_sequences: Sequence[Sequence[int]] = (),
             truncate_prompt: bool = False, mesh: Any = None) -> list[list[int]]:
    """Samples continuations of token prompts: one prefill, then one jitted while_loop. A row
    whose text outgrows the context slides its window: it keeps its last `kept_tokens(context)`
    tokens, prefills them again and goes on, as often as needed (each slide costs a prefill of
    the kept tokens, one every context + 1 - kept new tokens).

    Args:
      params: the model's parameters (the training tree; sharded on `mesh` if given).
      cfg: the model's config.
      prompts: token-id lists, of any lengths up to the context (each row equals sampling that
        prompt alone).
      max_new_tokens: tokens to generate per row, at most; any number (the window slides).
      temperature: 0 is greedy; top_k (0: off) and top_p (1: off) combine with it.
      seed: the random stream; sample s of every prompt uses the stream (seed, s).
      key: a JAX PRNG key to use instead of `seed` (it wins when both are given); sample s of
        every prompt uses `fold_in(key, s)`, and `key=jax.random.key(n)` equals `seed=n`.
      num_samples: samples per prompt.
      eos_id: a row ends when it emits this id, which is left out of its result.
      stop_sequences: a row ends after emitting any of these (kept in its result).
      truncate_prompt: keep only a prompt's last context_length tokens when it is longer,
        instead of raising.
      mesh: a `jax.sharding.Mesh` to decode on (batch over data×fsdp, heads over tensor).
    Returns:
      The new tokens of every sample, in prompt order × num_samples.
    Raises:
      UserError: an empty prompt, a prompt over the context length, or bad sampling settings.
    """
    out: list[list[int]] | None = None
    for new in generate_stream(params, cfg, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               key=key, num_samples=num_samples, eos_id=eos_id,
                               stop_sequences=stop_sequences, truncate_prompt=truncate_prompt,
                               mesh=mesh, chunk_size=max_new_tokens):
        out = new if out is None else [a + b for a, b in zip(out, new)]
    assert out is not None
    return out
