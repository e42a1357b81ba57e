"""Sampling: the jitted decoder against full recomputation, the filters, seeds, ragged batches,
end-of-text, a mesh, and the bare loop on a fake model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model, sharding
from gptjax.decode import generate
from gptjax.config import MeshConfig
from gptjax.errors import UserError
from gptjax.decode.generate import Sampling
from helpers import cudnn_as_xla, tiny

# A wide init makes the logits peaked, so no argmax hangs on a 1e-6 difference between cached
# and recomputed attention.
CFG = tiny(init_std=0.3)
# Lengths 3, 11 and 6 plus 12 new tokens run past local_window=8: the ring buffer wraps.
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43, 44, 45]]
NEW = 12
SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.9)


@functools.cache
def params():
    return model.init_params(CFG, jax.random.key(0))


@functools.cache
def greedy():
    return generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, temperature=0.0)


def test_greedy_equals_argmax_over_full_recomputation() -> None:
    # Causal, so the logits at position i ignore the zeros after it: one shape, one compile.
    forward = jax.jit(lambda p, t: model.GPT(CFG).apply({"params": p}, t[None])[0])
    for prompt, out in zip(PROMPTS, greedy()):
        toks = list(prompt)
        for _ in range(NEW):
            padded = jnp.array(toks + [0] * (CFG.context_length - len(toks)))
            toks.append(int(jnp.argmax(forward(params(), padded)[len(toks) - 1])))
        assert out == toks[len(prompt):]
    assert len(set(greedy()[1])) > 2, "degenerate model output would make this test weak"


def test_bucketed_cache_reads_equal_whole_cache_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps read only the cache prefix the longest row needs (buckets of 4, 8, 16, 32
    here, crossed as rows grow); the text is that of steps reading the whole cache."""
    real, seen = generate.attend_buckets, []

    def run(smallest: int) -> list[list[int]]:
        def buckets(max_len: int) -> list[int]:
            seen.append(real(max_len, smallest))
            return seen[-1]

        monkeypatch.setattr(generate, "attend_buckets", buckets)
        generate.programs.cache_clear()
        return generate.generate(params(), CFG, PROMPTS, max_new_tokens=30, temperature=0.0)

    whole = run(10**6)
    assert len(seen[-1]) == 1
    bucketed = run(4)
    assert len(seen[-1]) >= 4, seen
    generate.programs.cache_clear()
    assert bucketed == whole
    assert [row[:NEW] for row in whole] == greedy()


def test_decode_segments_cover_what_each_step_attends() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        max_len = int(rng.integers(2, 3000))
        longest = int(rng.integers(1, max_len))
        step = int(rng.integers(1, max_len - longest + 1))
        want = int(rng.integers(step + 1, max_len - longest + 2))
        end, L = generate.decode_segment(step, want, longest, max_len)
        assert step < end <= want and L in generate.attend_buckets(max_len)
        # The step entered at s feeds position longest + s - 1: it reads positions < longest + s.
        assert longest + end - 1 <= L  # the segment's last step fits its bucket...
        smaller = [b for b in generate.attend_buckets(max_len) if b < L]
        assert not smaller or longest + step > smaller[-1]  # ...and its first needs this one
        assert end == want or longest + end > L  # it stops early only at the bucket's edge


def test_top_k_1_equals_greedy() -> None:
    out = generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, temperature=1.3, top_k=1,
                            seed=7)
    assert out == greedy()


def test_top_p_keeps_exactly_the_smallest_set() -> None:
    probs = np.array([0.05, 0.4, 0.02, 0.3, 0.2, 0.03])  # descending: ids 1, 3, 4, 0, 5, 2
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    expected = {0.3: {1}, 0.41: {1, 3}, 0.69: {1, 3}, 0.71: {1, 3, 4}, 0.92: {1, 3, 4, 0},
                0.96: {1, 3, 4, 0, 5}, 0.99: {0, 1, 2, 3, 4, 5}, 1.0: {0, 1, 2, 3, 4, 5}}
    for p, keep in expected.items():
        kept = np.flatnonzero(np.isfinite(generate.filter_logits(logits, top_p=p)[0]))
        assert set(kept.tolist()) == keep, f"top_p={p}"
    # Combined with top-k, top-p acts on the distribution renormalized over the top k: there id 1
    # alone has 0.4/0.7 >= 0.5, while without top-k it needs id 3 too.
    kept = np.isfinite(generate.filter_logits(logits, top_k=2, top_p=0.5)[0])
    assert set(np.flatnonzero(kept).tolist()) == {1}
    kept = np.isfinite(generate.filter_logits(logits, top_p=0.5)[0])
    assert set(np.flatnonzero(kept).tolist()) == {1, 3}
    kept_vals = generate.filter_logits(logits, top_p=0.8)[0]
    np.testing.assert_array_equal(kept_vals[np.array([1, 3, 4])], logits[0, np.array([1, 3, 4])])

    # The sampler draws from that set and only from it (2048 draws).
    def fixed(tokens_B1, cache):
        return jnp.broadcast_to(logits, (tokens_B1.shape[0], 6)), cache

    s = Sampling(temperature=1.0, top_p=0.71)
    keys = jax.random.split(jax.random.key(0), 256)
    state = generate.init_state(fixed(jnp.zeros((256, 1), jnp.int32), None)[0], None, keys,
                                max_new_tokens=8, sampling=s)
    state = jax.jit(functools.partial(generate.sample_loop, fixed, sampling=s))(state, 8)
    drawn = np.asarray(state.tokens_BN)
    assert set(np.unique(drawn).tolist()) == {1, 3, 4}
    # Proportions follow the renormalized probabilities 0.4/0.9, 0.3/0.9, 0.2/0.9.
    freq = np.array([(drawn == i).mean() for i in (1, 3, 4)])
    np.testing.assert_allclose(freq, np.array([4, 3, 2]) / 9, atol=0.04)


def test_same_seed_same_text_other_seed_other_text() -> None:
    run = functools.partial(generate.generate, params(), CFG, PROMPTS[:1], max_new_tokens=NEW,
                            num_samples=2, **SAMPLED)
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert a == b
    assert a != c
    assert a[0] != a[1], "samples of one prompt draw from different streams"


def test_ragged_batch_equals_rows_alone() -> None:
    run = functools.partial(generate.generate, params(), CFG, max_new_tokens=NEW, num_samples=2,
                            seed=5, **SAMPLED)
    together = run(PROMPTS)
    alone = [row for p in PROMPTS for row in run([p])]
    assert together == alone
    assert all(len(r) == NEW for r in together)


def test_row_that_emits_eot_stops_while_others_go_on() -> None:
    out0, out1 = greedy()[:2]
    # An id the first row emits (not first) and the second row never does.
    i = next(i for i, t in enumerate(out0) if i > 0 and t not in out1 and t not in out0[:i])
    eot = out0[i]
    got = generate.generate(params(), CFG, PROMPTS[:2], max_new_tokens=NEW, temperature=0.0,
                            eos_id=eot)
    assert got == [out0[:i], out1]  # end-of-text itself is not returned


def test_sharded_decode_equals_unsharded() -> None:
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = sharding.init_sharded_params(CFG, mesh, jax.random.key(1))
    assert sharded["wte"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    plain = jax.device_get(sharded)
    # 3 rows on 4 data-parallel shards: the batch is padded with ended rows.
    kw = dict(max_new_tokens=NEW, seed=2, **SAMPLED)
    got = generate.generate(sharded, CFG, PROMPTS, mesh=mesh, **kw)
    want = generate.generate(plain, CFG, PROMPTS, **kw)
    assert got == want


def test_sampler_loop_on_fake_logits_fn() -> None:
    """next = token + 1; the cache counts the calls, so early stopping is visible."""
    V = 50

    def plus_one(tokens_B1, calls):
        return 10.0 * jax.nn.one_hot(tokens_B1[:, 0] + 1, V), calls + 1

    def run(sampling_: Sampling, starts: list[int], max_new: int, limits: list[int],
            unroll: int = 1):
        first, calls = plus_one(jnp.array(starts)[:, None], jnp.int32(0))
        keys = jax.random.split(jax.random.key(0), len(starts))
        state = generate.init_state(first, calls, keys, max_new_tokens=max_new,
                                    sampling=sampling_)
        loop = jax.jit(functools.partial(generate.sample_loop, plus_one, sampling=sampling_,
                                         unroll=unroll))
        for limit in limits:
            state = loop(state, limit)
        rows = [np.asarray(state.tokens_BN[b, : state.num_B[b]]).tolist()
                for b in range(len(starts))]
        return rows, int(state.cache)

    greedy_ = Sampling(temperature=0.0)
    rows, calls = run(greedy_, [3, 10], 6, [6])
    assert rows == [[4, 5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16]]
    assert calls == 6  # the prefill's call and 5 decode steps: none wasted
    # Decoding in chunks (as generate_stream does) gives the same tokens.
    assert run(greedy_, [3, 10], 6, [2, 3, 6, 6]) == (rows, calls)
    # End-of-text 7 ends row 0 (7 is not kept); row 1 runs on; no step after all rows end.
    rows, calls = run(Sampling(temperature=0.0, eos_id=7), [3, 10], 6, [6])
    assert rows == [[4, 5, 6], [11, 12, 13, 14, 15, 16]]
    rows, calls = run(Sampling(temperature=0.0, eos_id=7), [3, 4], 20, [20])
    assert rows == [[4, 5, 6], [5, 6]] and calls == 4
    # A stop sequence ends a row after it (it is kept); a single-token one too.
    s = Sampling(temperature=0.0, stop_sequences=((12, 13), (30,), (6, 9)))
    rows, calls = run(s, [10, 27, 0], 8, [8])
    assert rows == [[11, 12, 13], [28, 29, 30], [1, 2, 3, 4, 5, 6, 7, 8]]
    # Several steps per loop iteration: the same tokens, never a step past a limit (chunks of
    # 2, 3, 6 with unroll 4 take the single-step tail), and past the end of every row by less
    # than the unroll.
    for unroll in (2, 4):
        assert run(greedy_, [3, 10], 6, [6], unroll) == ([[4, 5, 6, 7, 8, 9],
                                                          [11, 12, 13, 14, 15, 16]], 6)
        assert run(greedy_, [3, 10], 6, [2, 3, 6, 6], unroll)[1] == 6
        rows, calls = run(Sampling(temperature=0.0, eos_id=7), [3, 4], 20, [20], unroll)
        assert rows == [[4, 5, 6], [5, 6]] and 4 <= calls < 4 + unroll
        assert run(s, [10, 27, 0], 8, [8], unroll)[0] == [[11, 12, 13], [28, 29, 30],
                                                         [1, 2, 3, 4, 5, 6, 7, 8]]


def test_decode_unroll_gives_the_same_text(monkeypatch) -> None:
    want = generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, seed=1, **SAMPLED)
    monkeypatch.setattr(generate, "DECODE_UNROLL", 3)
    assert generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, seed=1,
                             **SAMPLED) == want


@pytest.mark.slow
def test_cudnn_step_attention_gives_the_same_text(monkeypatch, capsys) -> None:
    """model.decode_attention_impl=cudnn reaches every layer's step (cuDNN played by jax's XLA
    version here; tests/test_gpu_lowering.py checks the CUDA program calls cuDNN)."""
    # Off a GPU, or in fp32 on one, cudnn falls back to xla with a warning: a run trained on a
    # GPU still samples here.
    fp32 = dataclasses.replace(CFG, decode_attention_impl="cudnn")
    for pretend_gpu in (False, True):
        generate.programs.cache_clear()
        with pytest.MonkeyPatch.context() as mp:
            asked = cudnn_as_xla(mp) if pretend_gpu else []
            assert generate.generate(params(), fp32, PROMPTS, max_new_tokens=NEW,
                                     temperature=0.0) == greedy()
        assert asked == []
        err = capsys.readouterr().err
        assert ("model.dtype is float32" if pretend_gpu else "no GPU here") in err, err
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    want = generate.generate(params(), bf16, PROMPTS, max_new_tokens=NEW, temperature=0.0)
    asked = cudnn_as_xla(monkeypatch)
    got = generate.generate(params(), dataclasses.replace(bf16, decode_attention_impl="cudnn"),
                            PROMPTS, max_new_tokens=NEW, temperature=0.0)
    assert asked and set(asked) == {"cudnn"}
    assert got == want


def test_limits_prompt_too_long_truncation_and_empty_prompt() -> None:
    # max_new_tokens past the context no longer raises (the window slides: tests below); only a
    # prompt longer than the context does.
    long = list(range(1, 51))  # 50 tokens > context 48
    with pytest.raises(UserError, match="prompt of 50 tokens exceeds the context length of 48"):
        generate.generate(params(), CFG, [long], max_new_tokens=NEW)
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate.generate(params(), CFG, [[1], []], max_new_tokens=NEW)
    kept = generate.generate(params(), CFG, [long], max_new_tokens=NEW, temperature=0.0,
                             truncate_prompt=True)
    assert kept == generate.generate(params(), CFG, [long[-48:]], max_new_tokens=NEW,
                                     temperature=0.0)


# --- generation past the context: the window slides ---------------------------------------------

SLIDE_CFG = tiny(init_std=0.3, context_length=32)
SLIDE_PROMPTS = [[5, 17, 3], list(range(1, 21)), list(range(60, 92))]  # 3, 20 and 32 = context
LONG = 100


@functools.cache
def slide_params():
    return model.init_params(SLIDE_CFG, jax.random.key(3))


@functools.cache
def slid_greedy():
    return generate.generate(slide_params(), SLIDE_CFG, SLIDE_PROMPTS, max_new_tokens=LONG,
                             temperature=0.0)


def test_window_rule() -> None:
    ctx, keep = 32, generate.kept_tokens(32)
    assert keep == 16
    assert [generate.window_start(n, ctx) for n in (1, 32, 33, 49, 50, 66, 67)] == \
        [0, 0, 17, 17, 34, 34, 51]
    for n in range(1, 400):
        start = generate.window_start(n, ctx)
        assert keep <= n - start <= ctx or n < keep  # the model sees half to all its context


def test_greedy_past_the_context_equals_naive_sliding_reference() -> None:
    """100 new tokens with context 32: each step's argmax over a full forward pass on the
    window the slide rule gives (within a window this is the KV-cache equality)."""
    ctx = SLIDE_CFG.context_length
    forward = jax.jit(lambda p, t: model.GPT(SLIDE_CFG).apply({"params": p}, t[None])[0])
    for prompt, out in zip(SLIDE_PROMPTS, slid_greedy()):
        assert len(out) == LONG
        toks = list(prompt)
        for _ in range(LONG):
            window = toks[generate.window_start(len(toks), ctx):]
            padded = jnp.array(window + [0] * (ctx - len(window)))
            toks.append(int(jnp.argmax(forward(slide_params(), padded)[len(window) - 1])))
        assert out == toks[len(prompt):]
    assert len(set(slid_greedy()[0][40:])) > 2, "degenerate output would make this test weak"


def test_past_the_context_streamed_equals_whole_and_rows_alone() -> None:
    kw = dict(max_new_tokens=LONG, seed=4, num_samples=2, **SAMPLED)
    whole = generate.generate(slide_params(), SLIDE_CFG, SLIDE_PROMPTS, **kw)
    chunks = list(generate.generate_stream(slide_params(), SLIDE_CFG, SLIDE_PROMPTS,
                                           chunk_size=7, **kw))
    assert len(chunks) > 10
    streamed = [sum((c[b] for c in chunks), []) for b in range(len(whole))]
    assert streamed == whole
    assert all(len(r) == LONG for r in whole)
    alone = generate.generate(slide_params(), SLIDE_CFG, SLIDE_PROMPTS[1:2], **kw)
    assert alone == whole[2:4]  # rows slide on their own schedules, whatever the batch


def test_end_of_text_and_stop_sequences_after_a_slide() -> None:
    out = slid_greedy()[0]
    # A token first emitted after the first slide (new token 30 of a 3-token prompt).
    i = next(i for i, t in enumerate(out) if i > 40 and t not in out[:i])
    got = generate.generate(slide_params(), SLIDE_CFG, SLIDE_PROMPTS[:1], max_new_tokens=LONG,
                            temperature=0.0, eos_id=out[i])
    assert got == [out[:i]]
    stop = tuple(out[i - 1 : i + 1])  # first seen ending at i: out[i] is new there
    got = generate.generate(slide_params(), SLIDE_CFG, SLIDE_PROMPTS[:1], max_new_tokens=LONG,
                            temperature=0.0, stop_sequences=[stop])
    assert got == [out[:i + 1]]


def test_key_equals_seed_and_the_jitted_core_equals_generate() -> None:
    """`generate(key=jax.random.key(n))` is `generate(seed=n)`; `generate_tokens`, the pure core,
    under jax.jit gives generate's tokens for the same key (each prompt's first sample)."""
    key = jax.random.key(7)
    by_seed = generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, seed=7, **SAMPLED)
    assert generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, key=key,
                             **SAMPLED) == by_seed
    # key wins over seed; raw key data works as well as a typed key.
    assert generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, seed=3,
                             key=jax.random.key_data(key), **SAMPLED) == by_seed
    T = max(map(len, PROMPTS))
    tokens = np.zeros((len(PROMPTS), T), np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    core = jax.jit(generate.generate_tokens, static_argnames=("cfg", "max_new_tokens", "sampling"))
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    out, num = core(params(), CFG, tokens, lengths, key, max_new_tokens=NEW, sampling=s)
    assert out.shape == (len(PROMPTS), NEW) and num.tolist() == [NEW] * len(PROMPTS)
    assert np.asarray(out).tolist() == by_seed
    # A second sample of each prompt is generate's sample 1.
    two = generate.generate(params(), CFG, PROMPTS, max_new_tokens=NEW, key=key, num_samples=2,
                            **SAMPLED)
    out1, _ = core(params(), CFG, tokens, lengths, key, max_new_tokens=NEW, sampling=s,
                   sample_index_B=np.ones(len(PROMPTS), np.uint32))
    assert np.asarray(out1).tolist() == two[1::2] and two[0::2] == by_seed
    with pytest.raises(UserError, match="exceed the context"):
        generate.generate_tokens(params(), CFG, tokens, lengths, key,
                                 max_new_tokens=CFG.context_length, sampling=s)


def test_one_token_chooser_for_generate_and_the_server() -> None:
    """The server's engine and `generate` choose tokens with the same function and key rows the
    same way: per-row settings give, row by row, what one shared setting gives."""
    from gptjax.decode import choose
    from gptjax.serve import engine

    assert engine.choose_tokens is choose.choose_tokens is generate.sample_tokens.__globals__[
        "choose_tokens"]
    assert engine.step_keys is choose.step_keys and engine.row_keys is choose.row_keys
    # The server's raw key of choice j of a request seeded n is generate's sample j of seed n.
    rows = choose.row_keys(jax.random.key(11), np.arange(3))
    for j in range(3):
        np.testing.assert_array_equal(engine.key_data(11, j), jax.random.key_data(rows[j]))
    V, B = 64, 48
    logits = jax.random.normal(jax.random.key(1), (B, V)) * 3
    keys = choose.step_keys(rows[jnp.arange(B) % 3], 5)
    settings = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 8, 1.0), (1.0, 0, 0.7), (0.7, 5, 0.5),
                (1.2, V, 0.95)]
    t, k, p = (np.array([s[i] for s in settings] * (B // len(settings)), dtype)
               for i, dtype in ((0, np.float32), (1, np.int32), (2, np.float32)))
    mixed = np.asarray(jax.jit(choose.choose_tokens)(logits, keys, t, k, p))
    for j, (tj, kj, pj) in enumerate(settings):
        rows_j = np.arange(j, B, len(settings))
        alone = generate.sample_tokens(logits[rows_j], keys[rows_j], Sampling(tj, kj, pj))
        np.testing.assert_array_equal(mixed[rows_j], np.asarray(alone), err_msg=str(settings[j]))
