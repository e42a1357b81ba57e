"""model.attention_impl=splash (Pallas splash attention, in interpret mode on this CPU) equals the
masked reference: the kernel alone at every preset's head size, and a dense+local model's logits
and gradients, unsharded and on a data×fsdp×tensor mesh. Interpret mode is slow: sizes are tiny."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny

from gptjax import model, sharding
from gptjax.model import attention
from gptjax.model import splash
from gptjax.model.attention import causal_attention, reference_attention
from gptjax.config import MeshConfig


def _qkv(T: int, K: int, H: int = 2, B: int = 1) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (B, T, H, K), jnp.float32) for k in keys]


@pytest.mark.parametrize("K", [64, 80, 96, 128])
def test_every_preset_head_size(K: int) -> None:
    """Value head sizes below or between multiples of 128 lanes are padded and sliced back."""
    q, k, v = _qkv(32, K)
    for window in (None, 4):
        np.testing.assert_allclose(splash.splash_attention(q, k, v, window),
                                   reference_attention(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize(("backend", "splash_picked"), [("tpu", True), ("gpu", False),
                                                        ("cpu", False)])
def test_auto_picks_splash_on_tpu_only(monkeypatch, backend: str, splash_picked: bool) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert attention.use_splash("auto") is splash_picked
    assert attention.use_splash("splash")
    assert attention.use_cudnn("auto", jnp.bfloat16) is (backend == "gpu")


def test_block_sizes_follow_length_and_band() -> None:
    dense = splash.block_sizes(2048, None)
    assert (dense.block_q, dense.block_kv) == (512, 512)
    local = splash.block_sizes(2048, 256)
    assert (local.block_q, local.block_kv) == (512, 256)
    # 384 = 3 × 128: only 128-wide tiles divide it.
    assert (splash.block_sizes(384, 8).block_q, splash.block_sizes(384, 8).block_kv) == (128, 128)


def _loss_and_grads(cfg, params, toks):
    def loss(p):
        logits = model.GPT(cfg).apply({"params": p}, toks)
        return (logits * jnp.cos(jnp.arange(logits.shape[-1]))).mean(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_close_to_reference(cfg, params, toks, run=None) -> None:
    run = run or _loss_and_grads
    (_, logits), grads = run(cfg, params, toks)
    (_, ref_logits), ref_grads = _loss_and_grads(
        dataclasses.replace(cfg, attention_impl="reference"), params, toks)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("T", "window"), [
    # not a multiple of the 128-wide tile; three tiles, the band crossing them
    pytest.param(300, 8, marks=pytest.mark.slow),
    (40, 64),   # T shorter than the band: the local layer is plain causal
    (48, 1),    # a band of one: each token sees only itself
])
def test_model_logits_and_gradients_equal_reference(T: int, window: int) -> None:
    cfg = tiny(context_length=T, local_window=window, n_layer=2, attention_impl="splash")
    params = model.init_params(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    _assert_close_to_reference(cfg, params, toks)


def test_sharded_over_mesh_equals_reference() -> None:
    """Under data=2, fsdp=2, tensor=2 splash runs inside shard_map: each device its batch rows
    and its heads."""
    cfg = tiny(context_length=40, local_window=8, n_layer=2, attention_impl="splash")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = sharding.init_sharded_params(cfg, mesh, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (4, cfg.context_length), 0, cfg.vocab_size)

    def sharded(c, p, t):
        with sharding.activate(mesh):
            return _loss_and_grads(c, p, jax.device_put(t, sharding.batch_sharding(mesh)))

    with sharding.activate(mesh):
        q = jnp.zeros((4, 40, cfg.n_head, cfg.head_dim))
        text = jax.jit(lambda x: causal_attention(x, x, x, window=8, impl="splash")).lower(
            q).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text, "not under shard_map"
    _assert_close_to_reference(cfg, jax.device_get(params), toks, run=sharded)


@pytest.mark.slow
def test_five_train_steps_have_the_reference_losses() -> None:
    """Issue 17's bar: a tiny dense+local model trains under splash (interpret mode) with the
    losses reference attention gives, step for step."""
    from gptjax.train import optim
    from gptjax.config import OptimConfig
    from gptjax.train.state import TrainState, train_step

    cfg = tiny(context_length=48, local_window=8, n_layer=2, attention_impl="splash")
    tx = optim.make_optimizer(OptimConfig())
    toks = jax.random.randint(jax.random.key(2), (1, 2, 49), 0, cfg.vocab_size)
    batch = {"inputs": toks[..., :-1], "targets": toks[..., 1:],
             "mask": jnp.ones((1, 2, 48), jnp.float32)}

    def losses(impl: str) -> list[float]:
        c = dataclasses.replace(cfg, attention_impl=impl)
        params = model.init_params(c, jax.random.key(0))
        state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                           bad_streak=jnp.int32(0))
        step = jax.jit(lambda s, b: train_step(s, b, jnp.float32(1e-3), model_cfg=c, tx=tx))
        out = []
        for _ in range(5):
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
        return out

    got, want = losses("splash"), losses("reference")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[-1] < got[0]  # it trains
