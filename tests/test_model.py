import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.model import losses
from gptjax.model import GPT
from helpers import tiny


def apply(cfg, params, tokens, **kw):
    return GPT(cfg).apply({"params": params}, tokens, **kw)


def tokens_for(cfg, B=2, T=None, seed=1):
    T = T or cfg.context_length
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def test_shapes_and_padded_vocab_gets_no_mass() -> None:
    cfg = tiny()
    params = model.init_params(cfg, jax.random.key(0))
    assert params["wte"].shape == (cfg.padded_vocab_size, cfg.d_model)
    assert cfg.padded_vocab_size == 112 and cfg.vocab_size == 101
    logits = apply(cfg, params, tokens_for(cfg))
    assert logits.shape == (2, cfg.context_length, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    # Even if the padding rows were trained to be huge, no padded id could be sampled.
    params["wte"] = params["wte"].at[cfg.vocab_size:].set(100.0)
    probs = jax.nn.softmax(apply(cfg, params, tokens_for(cfg)), -1)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_gpt2_init_scales_residual_projections() -> None:
    cfg = tiny(n_layer=8, d_model=128, d_ff=512)
    p = model.init_params(cfg, jax.random.key(0))["layers"]["block0"]
    std = 0.02 / math.sqrt(2 * 8)
    assert abs(float(p["attn"]["out_kernel"].std()) - std) < 0.1 * std
    assert abs(float(p["mlp"]["proj_kernel"].std()) - std) < 0.1 * std
    assert abs(float(p["mlp"]["fc_kernel"].std()) - 0.02) < 0.002
    assert float(jnp.abs(p["attn"]["qkv_bias"]).max()) == 0.0


def test_initial_loss_is_log_vocab() -> None:
    # Golden value: ln(vocab) at init, with 0.02-std weights the logits are nearly uniform.
    # It may change only if the init scheme changes (std, residual scaling, tied embeddings).
    cfg = tiny(vocab_size=257, vocab_multiple=128)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg, B=4)
    loss, count = losses.cross_entropy(apply(cfg, params, toks)[:, :-1], toks[:, 1:])
    assert int(count) == 4 * (cfg.context_length - 1)
    assert abs(float(loss) - math.log(257)) < 0.1


@pytest.mark.parametrize("pattern,n_layer", [(("dense",), 2), (("local",), 1), (("local",), 2),
                                             (("dense", "local"), 2)])
def test_causality_through_gradients(pattern, n_layer) -> None:
    """The loss at position t has zero gradient w.r.t. the inputs at later positions, and, with
    only local layers, w.r.t. inputs more than n_layer·(w - 1) back. Row s of the position table
    is added to the input at position s only, so its gradient is the input's gradient."""
    w = 5
    cfg = tiny(attention_pattern=pattern, n_layer=n_layer, local_window=w, context_length=24)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg, B=1)
    t = 17

    def loss_at_t(wpe):
        logits = apply(cfg, dict(params, wpe=wpe), toks)
        return -jax.nn.log_softmax(logits[0, t])[toks[0, t + 1]]

    g = jax.grad(loss_at_t)(params["wpe"])
    norms = np.asarray(jnp.abs(g).sum(-1))
    assert np.all(norms[t + 1 :] == 0.0), "a later token influenced the loss at position t"
    if "dense" in pattern:
        assert np.all(norms[: t + 1] > 0)
    else:
        reach = n_layer * (w - 1)
        assert np.all(norms[: t - reach] == 0.0), "a token beyond the band influenced position t"
        assert np.all(norms[t - reach : t + 1] > 0)


def test_local_window_covering_context_equals_dense() -> None:
    cfg = tiny(context_length=32)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg)
    dense = apply(dataclasses.replace(cfg, attention_pattern=("dense", "dense")), params, toks)
    wide = apply(dataclasses.replace(cfg, local_window=32), params, toks)
    narrow = apply(cfg, params, toks)
    np.testing.assert_allclose(wide, dense, atol=1e-5)
    assert float(jnp.abs(narrow - dense).max()) > 1e-4  # the band really matters when narrow


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scan_unrolled_and_remat_agree(remat) -> None:
    cfg = tiny()
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg)
    ref = apply(cfg, params, toks)
    variant = dataclasses.replace(cfg, remat=remat)
    np.testing.assert_allclose(apply(variant, params, toks), ref, atol=1e-5)
    unrolled = dataclasses.replace(variant, scan_layers=False)
    np.testing.assert_allclose(apply(unrolled, model.unstack_layers(params, cfg), toks), ref, atol=1e-5)
    # Gradients agree too (remat changes what is recomputed, never the result).
    def loss(p, c):
        return losses.cross_entropy(apply(c, p, toks)[:, :-1], toks[:, 1:])[0]
    g_ref = jax.grad(loss)(params, cfg)
    g = jax.grad(loss)(params, variant)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_close_to_fp32() -> None:
    cfg = tiny()
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg)
    ref = apply(cfg, params, toks)
    out = apply(dataclasses.replace(cfg, dtype="bfloat16"), params, toks)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05
    assert float(jnp.abs(jax.nn.softmax(out) - jax.nn.softmax(ref)).max()) < 5e-3


def test_reference_impl_equals_default() -> None:
    cfg = tiny()
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg)
    np.testing.assert_allclose(
        apply(dataclasses.replace(cfg, attention_impl="reference"), params, toks),
        apply(cfg, params, toks), atol=1e-5,
    )


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("pattern", [("dense", "local"), ("local",)])
def test_prefill_then_decode_equals_full_forward(pattern, scan) -> None:
    """Past local_window, so the ring buffer wraps several times. Unrolled (scan=False, as the
    sampler runs) keeps one cache buffer per layer."""
    cfg = tiny(attention_pattern=pattern, n_layer=4, local_window=5, context_length=30)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg, B=2, T=30)
    full = apply(cfg, params, toks)
    if not scan:
        params, cfg = model.unstack_layers(params, cfg), dataclasses.replace(cfg, scan_layers=False)
    cache = model.init_cache(cfg, 2, 30)
    last = cache["layers"][-1] if scan else cache["layers"][-1][-1]
    assert last["k"].shape[-3] == (5 if pattern[-1] == "local" else 30)
    assert last["k"].ndim == (5 if scan else 4)
    prompt = 7
    logits, cache = apply(cfg, params, toks[:, :prompt], cache=cache)
    steps = [logits]
    step = jax.jit(lambda p, t, c: apply(cfg, p, t, cache=c))
    for i in range(prompt, 30):
        logits, cache = step(params, toks[:, i : i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    np.testing.assert_array_equal(cache["index"], [30, 30])


@pytest.mark.slow
def test_decode_reading_a_cache_prefix() -> None:
    """attend_len = exactly the positions a step needs gives the whole-cache logits; one short
    drops the newest key (the control)."""
    cfg = tiny(n_layer=2, context_length=40)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg, B=2, T=40)
    cache = model.init_cache(cfg, 2, 40)
    _, cache = apply(cfg, params, toks[:, :20], cache=cache)
    step = toks[:, 20:21]  # position 20: attends positions 0..20

    def logits(attend_len):
        out, _ = model.GPT(cfg, attend_len).apply({"params": params}, step, cache=cache)
        return out

    np.testing.assert_allclose(logits(21), logits(None), atol=1e-6)
    assert float(jnp.abs(logits(20) - logits(None)).max()) > 1e-3


@pytest.mark.slow
def test_ragged_prefill_commits_only_valid_tokens() -> None:
    cfg = tiny(n_layer=2, local_window=4, context_length=24)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg, B=2, T=24)
    lengths = jnp.array([9, 4])
    padded = jnp.where(jnp.arange(12)[None] < lengths[:, None], toks[:, :12], 0)
    cache = model.init_cache(cfg, 2, 24)
    _, cache = apply(cfg, params, padded, cache=cache, num_valid_B=lengths)
    np.testing.assert_array_equal(cache["index"], lengths)
    # Continue each row from its own length; compare with that row's full forward pass.
    nxt = jnp.stack([toks[0, 9:15], toks[1, 4:10]])
    logits, _ = apply(cfg, params, nxt, cache=cache)
    full0 = apply(cfg, params, toks[:1, :15])[0, 9:15]
    full1 = apply(cfg, params, toks[1:, :10])[0, 4:10]
    np.testing.assert_allclose(logits[0], full0, atol=1e-5)
    np.testing.assert_allclose(logits[1], full1, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_loss_equals_full_loss_and_gradient(dtype) -> None:
    """The fused chunked loss forms its gradient in the forward pass; autodiff of the plain
    loss is the reference. vocab 101 pads to 112 rows: padding must get neither probability nor
    gradient."""
    cfg = tiny(context_length=40, dtype=dtype)
    params = model.init_params(cfg, jax.random.key(0))
    toks = tokens_for(cfg, B=2, T=40)
    mask = (jax.random.uniform(jax.random.key(4), (2, 40)) > 0.3).astype(jnp.float32)

    def full(p):
        mean, count = losses.cross_entropy(apply(cfg, p, toks), toks, mask)
        return mean * count

    def chunked(p):
        x = apply(cfg, p, toks, return_hidden=True)
        total, count = losses.chunked_cross_entropy(x, p["wte"], toks, mask, cfg, chunk=16)  # 40 = 16+16+8
        assert float(count) == float(mask.sum())
        return total

    if dtype == "float32":
        np.testing.assert_allclose(chunked(params), full(params), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(jax.grad(chunked)(params)),
                        jax.tree.leaves(jax.grad(full)(params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # sums of ~80 token losses
    else:  # bf16 matmuls on both sides, rounded in different places
        np.testing.assert_allclose(chunked(params), full(params), rtol=1e-2)
        g_c, g_f = jax.grad(chunked)(params), jax.grad(full)(params)
        for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_f)):
            assert float(jnp.linalg.norm(a - b)) <= 2e-2 * float(jnp.linalg.norm(b)) + 1e-6
    g = jax.grad(chunked)(params)["wte"]
    assert cfg.padded_vocab_size > cfg.vocab_size and float(jnp.abs(g[cfg.vocab_size:]).max()) == 0


def _reference_layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps) * scale + bias


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_layer_norm_and_gelu_gradients_match_autodiff(dtype, tol) -> None:
    """The hand-written backward passes (which keep fewer activations) give autodiff's gradients
    of the same formulas, on random inputs with a nonzero mean and scale."""
    k = jax.random.split(jax.random.key(7), 5)
    x = (3 * jax.random.normal(k[0], (4, 16, 48)) + 1.5).astype(dtype)
    scale = 1 + 0.3 * jax.random.normal(k[1], (48,))
    bias = 0.1 * jax.random.normal(k[2], (48,))
    w = jax.random.normal(k[3], (4, 16, 48))  # a random cotangent, through a weighted sum

    def ours(x, s, b):
        return (model.layer_norm(x, s, b, 1e-5, dtype).astype(jnp.float32) * w).sum()

    def ref(x, s, b):
        return (_reference_layer_norm(x, s, b, 1e-5) * w).sum()

    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(ref, argnums=(0, 1, 2))(x.astype(jnp.float32), scale, bias)
    for g, r in zip(got, want):
        g = np.asarray(g, np.float32)
        assert np.linalg.norm(g - r) <= tol * np.linalg.norm(r)

    h = (2 * jax.random.normal(k[4], (4, 16, 48))).astype(dtype)
    g = jax.grad(lambda h: (model.gelu_tanh(h).astype(jnp.float32) * w).sum())(h)
    r = jax.grad(lambda h: (jax.nn.gelu(h, approximate=True) * w).sum())(h.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(model.gelu_tanh(h), np.float32),
                               jax.nn.gelu(h.astype(jnp.float32), approximate=True),
                               rtol=tol, atol=tol)
    assert np.linalg.norm(np.asarray(g, np.float32) - r) <= tol * np.linalg.norm(r)


def test_block_keeps_no_fp32_or_extra_mlp_activations_for_backward(capsys) -> None:
    """What a bf16 block saves for its backward pass: no fp32 [B, T, D] LayerNorm copies and at
    most two [B, T, d_ff] tensors (the GELU's input and output; autodiff of the formulas kept
    three fp32 copies per LayerNorm and six MLP tensors)."""
    from jax.ad_checkpoint import print_saved_residuals

    cfg = tiny(dtype="bfloat16", d_model=16, n_head=2, d_ff=64, context_length=8)
    blk = model.Block(cfg, "dense")
    x = jnp.ones((2, 8, 16), jnp.bfloat16)
    variables = blk.init(jax.random.key(0), x, None, None, None)
    print_saved_residuals(
        lambda v, x: blk.apply(v, x, None, None, None)[0].astype(jnp.float32).sum(), variables, x)
    saved = capsys.readouterr().out.splitlines()
    assert not [s for s in saved if s.startswith("f32[2,8,16]")], saved
    assert len([s for s in saved if s.startswith("bf16[2,8,64]")]) <= 2, saved


def test_gelu_backward_recomputes_tanh_after_xla_optimizes() -> None:
    """The GELU's backward pass recomputes its tanh in the compiled program too: XLA's
    common-subexpression elimination would otherwise merge it with the forward's and keep the
    fp32 tanh alive between the passes (seen in an H200 trace: 4 bytes per d_ff element)."""
    import re

    h = jnp.ones((4, 8, 64), jnp.bfloat16)
    w = jnp.ones((4, 8, 64), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda h: (model.gelu_tanh(h).astype(jnp.float32) * w).sum()))
    hlo = step.lower(h).compile().as_text()
    assert len(re.findall(r"\btanh\(", hlo)) == 2, hlo


def test_stack_layers_inverts_unstack_layers() -> None:
    cfg = tiny(n_layer=4)
    params = model.init_params(cfg, jax.random.key(3))
    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    flat = model.unstack_layers(params, cfg)
    assert "layers" not in flat and "layers_1" in flat
    back = model.stack_layers(flat, unrolled_cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_init_params_compiles_once_per_config_and_axis_rules() -> None:
    """init_params is jitted per config; flax's logical axis rules are part of its key, as the
    model's constraints read them and jit's own cache does not."""
    import flax.linen as nn

    from gptjax import sharding
    from gptjax.model import gpt

    cfg = tiny(n_layer=1, d_model=48)  # a config no other test in this process has used
    first = model.init_params(cfg, jax.random.key(1))
    size = gpt._init_params._cache_size()
    again = model.init_params(cfg, jax.random.key(1))
    assert gpt._init_params._cache_size() == size  # the same program, not traced again
    jax.tree.map(np.testing.assert_array_equal, first, again)
    with nn.logical_axis_rules(sharding.RULES):
        ruled = model.init_params(cfg, jax.random.key(1))
    assert gpt._init_params._cache_size() == size + 1
    jax.tree.map(np.testing.assert_array_equal, first, ruled)  # no mesh: the same values
    assert jax.tree.map(jnp.shape, model.param_shapes(cfg)) == jax.tree.map(jnp.shape, first)
