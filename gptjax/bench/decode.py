"""Prefill time and decode speed of the jitted sampler."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.decode import generate
from gptjax.model.attention import step_attention, step_kernel
from gptjax.bench.common import median_time
from gptjax.config import ModelConfig
from gptjax.errors import UserError


def _time_batch(params: Any, programs: tuple[Any, Any], B: int, prompt_len: int,
                new_tokens: int, max_len: int, vocab: int, repeats: int, seed: int
                ) -> dict[str, float]:
    """Prefill and decode times of batch B (compiled first, then medians of `repeats`)."""
    prefill, decode, _ = programs  # (the third slides the window: not timed here)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (B, prompt_len)), jnp.int32)
    lengths = jnp.full((B,), prompt_len, jnp.int32)
    keys = jax.random.split(jax.random.key(seed), B)
    active = jnp.ones((B,), bool)

    def run_prefill() -> generate.SamplerState:
        return prefill(params, tokens, lengths, keys, active, max_len=max_len,
                       max_new=new_tokens)

    def run_decode(s: generate.SamplerState) -> generate.SamplerState:
        step = 1  # the prefill samples the first token
        while step < new_tokens:  # one call unless the text crosses a bucket
            step, L = generate.decode_segment(step, new_tokens, prompt_len, max_len)
            s = decode(params, s, jnp.int32(step), attend_len=L)
        return s

    final = jax.block_until_ready(run_decode(run_prefill()))  # compile both
    # The timing below divides by the steps decoded: check the loop ran every one of them
    # (an early stop would make a fast-looking figure out of less work).
    done = int(final.step), np.asarray(final.num_B)
    if done[0] != new_tokens or (done[1] != new_tokens).any():
        raise RuntimeError(f"the decoder sampled {done[0]} of {new_tokens} tokens")
    prefill_s = median_time(run_prefill, repeats, warmup=False)
    decode_s = median_time(run_decode, repeats, setup=run_prefill, warmup=False)
    steps = new_tokens - 1  # the prefill samples the first token
    return {
        # The prefill samples the first token: its time is the time to the first token.
        "prefill_ms": 1e3 * prefill_s,
        "time_to_first_token_ms": 1e3 * prefill_s,
        "decode_ms_per_token": 1e3 * decode_s / steps,
        "decode_tokens_per_s": B * steps / decode_s,
        "decode_steps_timed": steps,
    }


def step_attention_error(cfg: ModelConfig, B: int, S: int, seed: int = 0) -> float:
    """Largest |difference| between cfg.decode_attention_impl's one-token step and xla's, on
    random q, k, v of the model's heads at batch B against S cache slots, each row filled to a
    random length: the check that a faster kernel still computes the same attention."""
    dt = jnp.dtype(cfg.dtype)
    kq, kk, kv, kl = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, 1, cfg.n_head, cfg.head_dim), dt)
    k, v = (jax.random.normal(x, (B, S, cfg.n_head, cfg.head_dim), dt) for x in (kk, kv))
    kv_len = jax.random.randint(kl, (B,), 1, S + 1)
    want, got = (jax.jit(step_attention, static_argnums=4)(q, k, v, kv_len, impl)
                 for impl in ("xla", cfg.decode_attention_impl))
    return float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())


def bench_decode(cfg: ModelConfig, *, batch_sizes: Sequence[int] = (1, 64),
              prompt_len: int | None = None, new_tokens: int | None = None,
              dtype: str | None = None, max_len: int | None = None, repeats: int = 5,
              seed: int = 0, unroll: int | None = None, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0) -> dict[str, Any]:
    """Prefill time and decode speed of the jitted sampler, random weights; greedy decoding
    unless `temperature` > 0 (then with `top_k` and `top_p`: the token choice's cost too).

    Args:
      cfg: the model (e.g. `gptjax.model_config("gpt3-small")`).
      batch_sizes: the batches to time; the summary keys read batch 1 and the largest.
      prompt_len: prompt tokens per row; None means min(128, max_len // 2).
      new_tokens: tokens decoded per row (no end-of-text: every step runs); None means
        min(128, max_len - prompt_len).
      dtype: compute dtype; None means bfloat16 on GPU/TPU and cfg.dtype on CPU.
      max_len: KV cache length; None means the model's context length (dense layers still
        read only the bucket of it the text needs: see `decode_segment`).
      repeats: timed runs per figure (after one untimed compile run); medians are reported.
      unroll: decode steps per iteration of the device loop; None means the sampler's
        default, `generate.DECODE_UNROLL`.
    Returns:
      {"prefill_ms_b1", "decode_ms_per_token_b1", "tokens_per_s_b<largest>", "per_batch": {B:
      {"prefill_ms", "decode_ms_per_token", "decode_tokens_per_s"}}, plus the settings}.
    """
    if dtype is None:
        dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else cfg.dtype
    # Inference weights stored in the compute dtype, as a serving setup would hold them.
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    # The kernel the decoder will really run (cudnn falls back to xla off GPU, with a warning).
    cfg = dataclasses.replace(cfg, decode_attention_impl=step_kernel(cfg.decode_attention_impl,
                                                                     dtype))
    max_len = max_len or cfg.context_length
    prompt_len = prompt_len or min(128, max_len // 2)
    new_tokens = new_tokens or min(128, max_len - prompt_len)
    if new_tokens < 2 or prompt_len + new_tokens > max_len or max_len > cfg.context_length:
        raise UserError(f"prompt_len={prompt_len} + new_tokens={new_tokens} (at least 2) must fit "
                        f"max_len={max_len} <= context_length={cfg.context_length}")
    params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(seed))
    unroll = unroll or generate.DECODE_UNROLL
    sampling = generate.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    programs = generate.programs(cfg, sampling, None, unroll)
    per_batch = {B: _time_batch(params, programs, B, prompt_len, new_tokens, max_len,
                                cfg.vocab_size, repeats, seed) for B in batch_sizes}
    result: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "dtype": dtype,
        "n_params": model.count_params(cfg),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "unroll": unroll,
        "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p},
        "step_attention": cfg.decode_attention_impl,
        "max_len": max_len,
        "repeats": repeats,
        "per_batch": per_batch,
    }
    if cfg.decode_attention_impl != "xla":
        # bf16 values of order 1 differ by a few 1e-3 between two correct kernels.
        result["step_attention_max_error"] = step_attention_error(cfg, max(batch_sizes), max_len,
                                                                  seed)
    if 1 in per_batch:
        result["prefill_ms_b1"] = per_batch[1]["prefill_ms"]
        result["time_to_first_token_ms_b1"] = per_batch[1]["time_to_first_token_ms"]
        result["decode_ms_per_token_b1"] = per_batch[1]["decode_ms_per_token"]
    big = max(batch_sizes)
    result[f"tokens_per_s_b{big}"] = per_batch[big]["decode_tokens_per_s"]
    return result
