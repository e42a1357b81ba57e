"""The GPU programs, lowered for CUDA on this CPU machine (no GPU needed): the train step calls
cuDNN's flash attention forward and backward, its loss never holds [B, T, V] logits, and the
decoder is one device loop with no host callback.

JAX checks the cuDNN version and the GPU's compute capability while tracing; with no GPU those
checks are stood in for (as an H100: cuDNN 9.10, compute capability 9.0). If JAX moves them,
`_pretend_cudnn` fails loudly rather than skipping."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from helpers import tiny

from gptjax import model
from gptjax.decode import generate
from gptjax.train import state as train_state


@pytest.fixture
def _pretend_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    from jax._src.cudnn import fused_attention_stablehlo as fa

    for name, fake in (("check_cudnn_version", lambda: 91000),
                       ("check_compute_capability", lambda c: True),
                       ("is_cuda_compute_capability_equal", lambda c: False)):
        assert hasattr(fa, name), f"jax moved {fa.__name__}.{name}: update this test"
        monkeypatch.setattr(fa, name, fake)


def _cuda_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r'custom_call @([\w$.-]+)\(', text))


def _train_step_text(cfg, B: int) -> str:
    from gptjax.train import optim
    from gptjax.config import OptimConfig

    tx = optim.make_optimizer(OptimConfig())
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    state = jax.eval_shape(lambda p: train_state.TrainState(
        step=jnp.int32(0), params=p, opt_state=tx.init(p), bad_streak=jnp.int32(0)), params)
    T = cfg.context_length
    batch = {"inputs": jax.ShapeDtypeStruct((1, B, T), jnp.int32),
             "targets": jax.ShapeDtypeStruct((1, B, T), jnp.int32),
             "mask": jax.ShapeDtypeStruct((1, B, T), jnp.float32)}
    step = functools.partial(train_state.train_step, model_cfg=cfg, tx=tx)
    return _cuda_text(step, state, batch, jax.ShapeDtypeStruct((), jnp.float32))


@pytest.mark.usefixtures("_pretend_cudnn")
def test_train_step_uses_cudnn_flash_attention_and_chunked_loss() -> None:
    B, T = 2, 64
    cfg = tiny(context_length=T, local_window=16, dtype="bfloat16", attention_impl="cudnn",
               loss_chunk=16, remat="dots")
    V = cfg.padded_vocab_size
    text = _train_step_text(cfg, B)
    calls = _custom_calls(text)
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= calls, calls
    # Never the whole [B, T, V] logits (in any float type); the chunks are [B, 16, V].
    assert not re.search(rf"tensor<{B}x{T}x{V}xf", text)
    assert re.search(rf"tensor<{B}x16x{V}xf32>", text)
    # The control: without loss_chunk they are there, so the check above can fail.
    whole = _train_step_text(dataclasses.replace(cfg, loss_chunk=0), B)
    assert re.search(rf"tensor<{B}x{T}x{V}xf32>", whole)


@pytest.mark.usefixtures("_pretend_cudnn")
def test_local_layers_pass_their_band_to_cudnn() -> None:
    from gptjax.model.attention import causal_attention

    q = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
    texts = {w: _cuda_text(functools.partial(causal_attention, window=w, impl="cudnn"), q, q, q)
             for w in (None, 16)}
    assert all("__cudnn$fmhaSoftmax" in t for t in texts.values())
    # The band travels in the call's config: a token sees itself and the 15 before it.
    band = {w: re.findall(r'sliding_window_length\\22: (\d+)', t) for w, t in texts.items()}
    assert band == {None: ["0"], 16: ["16"]}, band


def _decode_text(cfg, attend_len: int | None) -> str:
    prefill, decode, _ = generate.programs(cfg, generate.Sampling(temperature=1.0, top_k=5), None)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    B = 4
    state = jax.eval_shape(
        lambda p: prefill(p, jnp.zeros((B, 8), jnp.int32), jnp.full((B,), 8, jnp.int32),
                          jax.random.split(jax.random.key(0), B), jnp.ones((B,), bool),
                          max_len=32, max_new=16), params)
    return decode.trace(params, state, jnp.int32(16), attend_len=attend_len).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("attend_len", [None, 16])
def test_decoder_is_one_device_loop_without_host_calls(attend_len) -> None:
    """Exactly one loop (over tokens: the layers are unrolled), no conditional, no custom call
    (so no host callback), with and without a bucketed cache read."""
    text = _decode_text(tiny(dtype="bfloat16"), attend_len)
    assert text.count("stablehlo.while") == 1
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
    assert not _custom_calls(text), _custom_calls(text)


@pytest.mark.usefixtures("_pretend_cudnn")
def test_decoder_step_can_call_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """model.decode_attention_impl=cudnn: each layer's step (dense and ring alike) is one cuDNN
    call inside the same single loop, and still nothing calls the host. The dense layer's call
    reads the whole cache of 32 (no copy of the 16-position bucket), the ring layer's its 8
    slots."""
    from gptjax.model import attention

    monkeypatch.setattr(attention, "gpu_backend", lambda: True)
    cfg = tiny(dtype="bfloat16", n_layer=2, decode_attention_impl="cudnn")
    text = _decode_text(cfg, 16)
    assert text.count("stablehlo.while") == 1
    assert _custom_calls(text) == {"__cudnn$fmhaSoftmax"}, _custom_calls(text)
    loop = text[text.index("stablehlo.while"):]
    calls = [ln for ln in loop.splitlines() if "custom_call @__cudnn$fmhaSoftmax" in ln]
    assert len(calls) == 2, calls  # one per layer
    keys = sorted(re.findall(r"tensor<4x(\d+)x4x8xbf16>", " ".join(calls)))
    assert set(keys) == {"1", "32", "8"}, calls  # queries, dense keys, ring keys; no 16
