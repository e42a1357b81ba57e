import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.model import attention
from helpers import cudnn_as_xla


def qkv(B: int, T: int, H: int = 2, K: int = 8, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, T, H, K), jnp.float32) for k in ks]


@pytest.mark.parametrize(
    "T,w",
    [(50, 8), (64, 16), (37, 40), (37, 37), (20, 1), (130, 32), (33, 5)],
    ids=["ragged", "multiple", "w>T", "w=T", "w=1", "long", "small-w"],
)
def test_banded_equals_masked_reference(T: int, w: int) -> None:
    q, k, v = qkv(2, T)
    ref = attention.reference_attention(q, k, v, window=w)
    out = attention.banded_attention(q, k, v, w)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    # Also through the dispatcher used by the model.
    np.testing.assert_allclose(
        attention.causal_attention(q, k, v, window=w, impl="xla"), ref, atol=2e-6, rtol=1e-5
    )


def test_banded_block_larger_than_window() -> None:
    q, k, v = qkv(1, 70)
    ref = attention.reference_attention(q, k, v, window=6)
    np.testing.assert_allclose(attention.banded_attention(q, k, v, 6, block=16), ref, atol=2e-6)
    with pytest.raises(ValueError):
        attention.banded_attention(q, k, v, 6, block=4)


def test_reference_window_actually_limits() -> None:
    # A band must differ from dense once T exceeds the window: otherwise the tests above prove nothing.
    q, k, v = qkv(1, 30)
    dense = attention.reference_attention(q, k, v, window=None)
    local = attention.reference_attention(q, k, v, window=4)
    np.testing.assert_allclose(dense[:, :4], local[:, :4], atol=1e-6)
    assert float(jnp.abs(dense[:, 10:] - local[:, 10:]).max()) > 1e-3


def test_single_key_window_returns_values() -> None:
    q, k, v = qkv(1, 12)
    np.testing.assert_allclose(attention.banded_attention(q, k, v, 1), v, atol=1e-6)


@pytest.mark.parametrize("step_impl", ["xla", "cudnn"])
@pytest.mark.parametrize("window", [None, 6])
def test_cached_attention_chunks_equal_full(window: int | None, step_impl: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Feeding a sequence in uneven chunks through the cache equals one causal pass; the
    one-token chunks (the decoder's steps: at position 0, one slot filled; at 6, 16 and 17,
    wrapped) go through step_attention's kernel, cuDNN's done here by jax's XLA version."""
    asked = cudnn_as_xla(monkeypatch)
    T, H, K = 23, 2, 8
    q, k, v = qkv(2, T, H, K, seed=3)
    full = attention.reference_attention(q, k, v, window)
    S = T if window is None else window
    cache = {"k": jnp.zeros((2, S, H, K)), "v": jnp.zeros((2, S, H, K))}
    index = jnp.zeros((2,), jnp.int32)
    outs, start = [], 0
    for size in (1, 5, 1, 9, 1, 1, 5):
        sl = slice(start, start + size)
        o, cache = attention.cached_attention(
            q[:, sl], k[:, sl], v[:, sl], cache, index, jnp.full((2,), size), window,
            step_impl=step_impl)
        outs.append(o)
        index = index + size
        start += size
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-6)
    assert asked == (["cudnn"] * 4 if step_impl == "cudnn" else [])


def test_step_attention_reads_only_the_filled_slots() -> None:
    """Slots past kv_len hold garbage (a discarded future, an unwritten ring): neither kernel
    may read them, and a row with kv_len 1 returns its one value."""
    q, k, v = qkv(3, 1)
    _, k2, v2 = qkv(3, 10, seed=1)
    kv_len = jnp.array([1, 4, 10])
    junk = jnp.arange(10)[None, :, None, None] >= kv_len[:, None, None, None]
    dirty = [jnp.where(junk, 1e3, x) for x in (k2, v2)]
    for impl in ("xla", "cudnn"):
        with pytest.MonkeyPatch.context() as mp:
            cudnn_as_xla(mp)
            clean = attention.step_attention(q, k2, v2, kv_len, impl)
            np.testing.assert_allclose(attention.step_attention(q, *dirty, kv_len, impl), clean,
                                       atol=1e-6)
        np.testing.assert_allclose(clean[0], v2[0, :1], atol=1e-6)
        want = attention.masked_attention(q[1:2], k2[1:2, :4], v2[1:2, :4],
                                          jnp.ones((1, 1, 4), bool))
        np.testing.assert_allclose(clean[1:2], want, atol=2e-6)


def test_step_attention_lengths_past_the_cache_mean_all_of_it(monkeypatch) -> None:
    """Rows past the cache (sliding or finished rows, idle server slots: their outputs are
    discarded) read the whole cache, and cuDNN never gets a length beyond its keys."""
    real, lengths = jax.nn.dot_product_attention, []

    def record(*args, key_value_seq_lengths, implementation, **kw):
        lengths.append((np.asarray(key_value_seq_lengths), args[1].shape[1]))
        return real(*args, key_value_seq_lengths=key_value_seq_lengths, implementation="xla",
                    **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q, k, v = qkv(2, 1)
    _, k2, v2 = qkv(2, 10, seed=1)
    past = jnp.array([10, 25])
    full = attention.step_attention(q, k2, v2, jnp.array([10, 10]), "xla")
    for impl in ("xla", "cudnn"):
        np.testing.assert_allclose(attention.step_attention(q, k2, v2, past, impl), full,
                                   atol=2e-6)
    ((got, S),) = lengths
    assert S == 10 and got.tolist() == [10, 10]
    with pytest.raises(ValueError, match="unknown kernel"):
        attention.step_attention(q, k2, v2, past, "flash")
