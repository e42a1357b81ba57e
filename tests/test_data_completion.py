"""Prompt → completion records: loss weights cached next to the tokens, carried with the windows
through tf.data, and prompt targets contributing nothing to the gradient."""

import gzip
import json
import random
import string

import jax
import numpy as np
import pytest
from helpers import needs_bpe, tiny

from gptjax import data
from gptjax.config import config_from_dict
from gptjax.data import plan
from gptjax.data.plan import make_plan
from gptjax.data import (
    DataError,
    TrainIterator,
    encode,
    eval_batches,
    load_mask,
    load_tokens,
)
from gptjax.model.losses import cross_entropy
from gptjax.model import GPT, init_params
from gptjax.tokenizer import get_tokenizer

T = 16


def make_cfg(tmp_path, source, **data_kw):
    data_cfg = {"source": str(source), "cache_dir": str(tmp_path / "cache"), "prefetch": 2}
    data_cfg.update(data_kw)
    vocab = 50257 if data_cfg.get("tokenizer") == "gpt2" else 257
    model = {"vocab_size": vocab, "context_length": T, "local_window": 8}
    return config_from_dict({"model": model, "data": data_cfg})


def write_jsonl(path, records, *, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def random_records(n, seed=0):
    """Random letters: every window of T + 1 tokens is unique, so a row locates itself."""
    rng = random.Random(seed)

    def text(lo, hi):
        return "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(4, 30), "completion": text(1, 20)} for _ in range(n)]


def expected(tok, records):
    """The stream and weights by the rule: prompt, completion, EOT; weight 0 on the prompt."""
    tokens, weights = [], []
    for r in records:
        p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
        if p or c:
            tokens += p + c + [tok.eot_id]
            weights += [0] * len(p) + [1] * (len(c) + 1)
    return np.array(tokens), np.array(weights)


def one_line(e):
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# The cache


@pytest.mark.parametrize("name", ["byte", pytest.param("gpt2", marks=needs_bpe)])
def test_weights_are_zero_on_prompt_tokens_and_one_on_completion(tmp_path, name):
    records = [
        {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"},
        {"prompt": "Hello", "completion": "world"},  # apart, not the BPE of "Helloworld"
        {"prompt": "déjà vu ⇒", "completion": " encore", "text": "ignored"},
        {"prompt": "", "completion": "no prompt"},
        {"prompt": "no completion", "completion": ""},
        {"prompt": "", "completion": ""},  # empty: no document, as for empty text
    ]
    write_jsonl(tmp_path / "src" / "ft.jsonl.gz", records, gz=True)
    cfg = make_cfg(tmp_path, f"{tmp_path}/src/*.jsonl.gz", tokenizer=name, val_fraction=1e-9)
    tok = get_tokenizer(name)
    want_tokens, want_mask = expected(tok, records)
    np.testing.assert_array_equal(load_tokens(cfg, "train"), want_tokens)
    mask = load_mask(cfg, "train")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, want_mask)
    manifest, path, _ = data.ensure_cache(cfg, "train")
    assert manifest["mask"] and (path / "mask.00000.bin").stat().st_size == len(mask)
    assert manifest["documents"] == 5 and manifest["loss_tokens"] == want_mask.sum()
    # The prompt's first token after an EOT is a target with weight 0: the weight is the target's.
    eots = np.flatnonzero(want_tokens == tok.eot_id)
    assert (want_mask[eots] == 1).all() and want_mask[eots[0] + 1] == 0


def test_plain_text_around_completions_weighs_one(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_jsonl(src / "b.jsonl", [{"prompt": "ask", "completion": "tell"}, {"text": "plain"}])
    (src / "a.txt").write_text("before")
    (src / "c.txt").write_text("after")
    monkeypatch.setattr(encode, "CHUNK_BYTES", 1)  # one file per chunk: weights start mid-build
    cfg = make_cfg(tmp_path, f"{src}/*", val_fraction=1e-9)
    tok = get_tokenizer("byte")
    assert tok.decode(load_tokens(cfg, "train")).split("<|endoftext|>") == [
        "before", "asktell", "plain", "after", "",
    ]  # fmt: skip
    want = [1] * 7 + [0] * 3 + [1] * 5 + [1] * 6 + [1] * 6
    np.testing.assert_array_equal(load_mask(cfg, "train"), want)


def test_plain_text_sources_store_no_mask(tmp_path):
    write_jsonl(tmp_path / "src" / "t.jsonl", [{"text": "a" * 40}, {"text": "b" * 40}])
    cfg = make_cfg(tmp_path, f"{tmp_path}/src/*.jsonl", val_fraction=1e-9)
    manifest, path, _ = data.ensure_cache(cfg, "train")
    assert manifest["mask"] is False and not list(path.glob("mask.*"))
    assert load_mask(cfg, "train") is None
    with TrainIterator(cfg, 2, process_index=0, process_count=1) as it:
        assert (next(it)["mask"] == 1).all()


def test_cache_without_weights_is_not_reused_for_completions(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "src" / "ft.jsonl", random_records(20))
    cfg = make_cfg(tmp_path, f"{tmp_path}/src/*.jsonl", val_fraction=1e-9)
    want = np.array(load_mask(cfg, "train"))
    manifest, path, _ = data.ensure_cache(cfg, "train")
    # A weight file that went missing.
    (path / "mask.00000.bin").unlink()
    capsys.readouterr()
    assert data.ensure_cache(cfg, "train")[2]
    assert "rebuilding" in capsys.readouterr().err
    np.testing.assert_array_equal(load_mask(cfg, "train"), want)
    # A weight file of the wrong size is not trusted either.
    with open(path / "mask.00000.bin", "ab") as f:
        f.write(b"\1")
    assert data.ensure_cache(cfg, "train")[2]
    # Caches of .jsonl sources are named by the record rule, so a new rule never meets an old
    # cache; caches of other sources keep their names.
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("plain")
    tok = get_tokenizer("byte")
    plans = [make_plan(c, "train", tok) for c in (cfg, make_cfg(tmp_path, f"{tmp_path}/txt/*"))]
    before = [p.digest() for p in plans]
    monkeypatch.setattr(plan, "JSONL_RULE", plan.JSONL_RULE + 1)
    assert [p.digest() != d for p, d in zip(plans, before)] == [True, False]


def test_bad_records(tmp_path):
    cases = [
        ({"prompt": 1, "completion": "x"}, "'prompt' and 'completion' must both be strings"),
        ({"prompt": "x"}, "no string field 'text' .*nor 'prompt' and 'completion'"),
        (["prompt", "completion"], "not a JSON object"),
    ]
    for i, (record, pattern) in enumerate(cases):
        write_jsonl(
            tmp_path / f"src{i}" / "bad.jsonl", [{"prompt": "ok", "completion": "ok"}, record]
        )
        cfg = make_cfg(tmp_path, f"{tmp_path}/src{i}/*.jsonl", val_fraction=1e-9)
        with pytest.raises(DataError, match=pattern) as e:
            load_tokens(cfg, "train")
        assert "bad.jsonl:2:" in one_line(e)


# ---------------------------------------------------------------------------------------------
# Windows


def locate(tokens, stride):
    """{window contents: start} for every window of the stream."""
    n = data.num_windows(len(tokens), T, stride)
    index = {
        np.asarray(tokens[s : s + T + 1], np.int32).tobytes(): s
        for s in range(0, n * stride, stride)
    }
    assert len(index) == n  # unique windows
    return index


def check_rows(batch, index, tokens, mask):
    """Each row is a window of the stream; returns its starts after checking its weights."""
    starts = []
    for x, y, m in zip(batch["inputs"], batch["targets"], batch["mask"]):
        s = index[np.concatenate([x, y[-1:]]).astype(np.int32).tobytes()]
        np.testing.assert_array_equal(y, tokens[s + 1 : s + T + 1])
        np.testing.assert_array_equal(m, mask[s + 1 : s + T + 1])
        starts.append(s)
    return starts


@pytest.mark.slow
def test_train_windows_carry_their_targets_weights_and_resume_exactly(tmp_path):
    write_jsonl(tmp_path / "src" / "ft.jsonl", random_records(40))
    stride = 5
    cfg = make_cfg(tmp_path, f"{tmp_path}/src/*.jsonl", val_fraction=1e-9, stride=stride, seed=3)
    tokens = np.asarray(load_tokens(cfg, "train"), np.int32)
    mask = np.asarray(load_mask(cfg, "train"), np.float32)
    index = locate(tokens, stride)
    n = len(index)
    with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
        batches = [next(it) for _ in range(-(-n // 4) + 2)]
    starts = []
    for b in batches:
        assert b["mask"].dtype == np.float32 and b["mask"].shape == (4, T)
        starts += check_rows(b, index, tokens, mask)
    assert sorted(starts[:n]) == list(range(0, n * stride, stride))
    # Windows across record boundaries: weights 1 on an EOT target, then 0 on the next prompt.
    eot = get_tokenizer("byte").eot_id
    spanning = [s for s in starts if eot in tokens[s + 1 : s + T]]
    assert spanning
    for s in spanning:
        j = s + 1 + int(np.flatnonzero(tokens[s + 1 : s + T] == eot)[0])
        assert mask[j] == 1 and mask[j + 1] == 0
    # A resumed iterator yields the same batches, weights included.
    with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
    with TrainIterator(cfg, 4, state=state, process_index=0, process_count=1) as it:
        for want in batches[5:9]:
            got = next(it)
            for key in ("inputs", "targets", "mask"):
                np.testing.assert_array_equal(got[key], want[key])


def test_eval_windows_carry_weights_and_padding_has_none(tmp_path):
    write_jsonl(tmp_path / "src" / "ft.jsonl", random_records(60, seed=1))
    cfg = make_cfg(tmp_path, f"{tmp_path}/src/*.jsonl", val_fraction=0.3)
    tokens = np.asarray(load_tokens(cfg, "validation"), np.int32)
    mask = np.asarray(load_mask(cfg, "validation"), np.float32)
    n = data.num_windows(len(tokens), T, T)
    size = 4 if n % 4 else 3
    rows = [
        r
        for b in eval_batches(cfg, size, process_index=0, process_count=1)
        for r in zip(*b.values())
    ]
    assert len(rows) == -(-n // size) * size > n
    for w, (inputs, targets, m) in enumerate(rows):
        if w < n:
            np.testing.assert_array_equal(targets, tokens[w * T + 1 : w * T + T + 1])
            np.testing.assert_array_equal(m, mask[w * T + 1 : w * T + T + 1])
        else:
            assert not m.any() and not inputs.any()
    assert 0 < sum(r[2].sum() for r in rows) < n * T  # some targets weigh 0, some 1


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_prompt_targets_contribute_zero_gradient(tmp_path):
    write_jsonl(tmp_path / "src" / "ft.jsonl", random_records(30, seed=2))
    cfg = make_cfg(tmp_path, f"{tmp_path}/src/*.jsonl", val_fraction=1e-9)
    with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
        batch = next(it)
    model_cfg = tiny(vocab_size=257, context_length=T, n_layer=2, vocab_multiple=1)
    # Jitted, with the rbg generator: threefry's init program takes seconds to compile on CPU.
    key = jax.random.key(0, impl="rbg")
    params = jax.jit(init_params, static_argnums=0)(model_cfg, key)

    # Everything as arguments: closed-over arrays would be baked into the program as constants.
    @jax.jit
    def grad_fn(params, inputs, targets, mask):
        def loss(p):
            return cross_entropy(GPT(model_cfg).apply({"params": p}, inputs), targets, mask)[0]

        return jax.value_and_grad(loss)(params)

    def loss_and_grad(targets, mask):
        return grad_fn(params, batch["inputs"], targets, mask)

    def changed(targets, where):
        out = targets.copy()
        out[where] = (out[where] + 1) % 256
        return out

    targets, mask = batch["targets"], batch["mask"]
    base_loss, base_grad = loss_and_grad(targets, mask)
    prompt = tuple(np.argwhere(mask == 0)[0])
    completion = tuple(np.argwhere(mask == 1)[0])

    loss, grad = loss_and_grad(changed(targets, prompt), mask)
    assert loss == base_loss
    jax.tree.map(np.testing.assert_array_equal, grad, base_grad)

    loss, grad = loss_and_grad(changed(targets, completion), mask)
    assert loss != base_loss
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), grad, base_grad)))
    # Unmasked, the same prompt target would count: the zero above comes from the weights.
    ones = np.ones_like(mask)
    assert loss_and_grad(changed(targets, prompt), ones)[0] != loss_and_grad(targets, ones)[0]
