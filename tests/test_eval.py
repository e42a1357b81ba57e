"""Evaluation: sliding windows score every token once, stride = context is the training loss,
stride 1 is each token with a full window of context, bits per byte, last-word accuracy, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config, model
from gptjax.eval import perplexity as ev
from gptjax.eval import scoring
from gptjax.model import losses
from gptjax.decode import generate
from gptjax.errors import UserError

from helpers import call_main, process_env, tiny, write_run

ROOT = Path(__file__).resolve().parent.parent
CFG = tiny(context_length=16, vocab_size=257, vocab_multiple=128)


@pytest.fixture(scope="module")
def params() -> dict:
    return model.init_params(CFG, jax.random.key(1))


def stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)


@pytest.mark.parametrize("n,T,S", [(2, 16, 16), (10, 16, 4), (17, 16, 16), (18, 16, 7),
                                   (100, 16, 1), (100, 16, 5), (161, 16, 16), (1000, 64, 48)])
def test_windows_score_every_token_once(n: int, T: int, S: int) -> None:
    w = ev.plan_windows(n, T, S)
    hits = np.zeros(n - 1, int)
    for i, (start, first) in enumerate(zip(w.start, w.score_from)):
        assert 0 <= start and start + w.length <= n - 1  # inputs and targets stay in the stream
        hits[start + first : start + w.length] += 1
        if i:  # after the first window: at least T - S tokens of left context
            assert first >= T - S
    assert (hits == 1).all()


def test_bad_stride() -> None:
    with pytest.raises(UserError, match=r"--stride must be in \[1, 16\]"):
        ev.plan_windows(100, 16, 17)


def test_stride_equal_context_is_training_loss(params: dict) -> None:
    T, k = CFG.context_length, 5
    tokens = stream(k * T + 1)
    got = ev.score_tokens(params, CFG, tokens, stride=T, batch_size=2)
    assert got["tokens"] == k * T and got["windows"] == k
    x = tokens.astype(np.int32)
    inputs = np.stack([x[i * T : (i + 1) * T] for i in range(k)])
    targets = np.stack([x[i * T + 1 : (i + 1) * T + 1] for i in range(k)])
    logits = model.GPT(CFG).apply({"params": params}, jnp.asarray(inputs))
    want = np.mean([float(losses.cross_entropy(logits[i : i + 1], targets[i : i + 1])[0])
                    for i in range(k)])
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(got["loss"]))


def test_stride_one_is_full_context_per_token(params: dict) -> None:
    """Stride 1: every target after the first window is predicted from a full window of T inputs
    ending right before it; checked against scoring each target on its own window."""
    T, n = CFG.context_length, 40
    tokens = stream(n, seed=1)
    got = ev.score_tokens(params, CFG, tokens, stride=1, batch_size=4)
    x = jnp.asarray(tokens.astype(np.int32))
    starts = np.arange(n - T)  # window s predicts tokens[s+1 .. s+T]
    logits = jax.vmap(lambda s: model.GPT(CFG).apply(
        {"params": params}, jax.lax.dynamic_slice(x, (s,), (T,))[None])[0])(starts)
    logp = jax.nn.log_softmax(logits, -1)
    nll = [-float(logp[0, j, x[j + 1]]) for j in range(T)]  # the first window: all of it
    nll += [-float(logp[s, T - 1, x[s + T]]) for s in starts[1:]]  # then the last position
    assert got["tokens"] == n - 1 == len(nll)
    np.testing.assert_allclose(got["loss"], np.mean(nll), rtol=1e-5)


def test_token_bytes() -> None:
    from gptjax.tokenizer import get_tokenizer

    b = ev.token_bytes(get_tokenizer("byte"))
    assert b.shape == (257,) and b[:256].min() == 1 and b[256] == 0


class Numbers:
    """A tokenizer of whitespace-separated integers, so examples are written as token ids."""

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def test_last_word_accuracy_is_greedy_decoding(params: dict) -> None:
    rng = np.random.default_rng(2)
    contexts = [rng.integers(0, 256, int(n)).tolist() for n in (3, 9, 13)]
    greedy = generate.generate(params, CFG, contexts, max_new_tokens=3, temperature=0.0)
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    right = [(text(c) + " ", text(g)) for c, g in zip(contexts, greedy)]  # space moves to target
    wrong = [(text(c), text(g[:2] + [(g[2] + 1) % 256])) for c, g in zip(contexts, greedy)]
    r = ev.last_word_accuracy(params, CFG, Numbers(), right + wrong, batch_size=4)
    assert r["examples"] == 6 and r["correct"] == 3 and r["accuracy"] == 0.5
    assert r["truncated"] == 0
    assert r["target_perplexity"] == pytest.approx(math.exp(r["target_nll"]))
    # A context longer than the window keeps its end.
    long = ev.last_word_accuracy(params, CFG, Numbers(), [(text(range(30)), "1 2 3")])
    assert long["examples"] == 1 and long["truncated"] == 1


def test_last_word_accuracy_is_loglikelihoods(params: dict) -> None:
    """Last-word accuracy is scoring.loglikelihoods over the (context, target) token pairs:
    the count of greedy pairs and the mean of their negated log-probabilities."""
    rng = np.random.default_rng(4)
    pairs = [(rng.integers(0, 256, int(n)).tolist(), rng.integers(0, 256, int(k)).tolist())
             for n, k in zip(rng.integers(1, 40, 12), rng.integers(1, 4, 12))]
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    r = ev.last_word_accuracy(params, CFG, Numbers(), [(text(c), text(t)) for c, t in pairs],
                              batch_size=3)
    want = scoring.loglikelihoods(params, CFG, pairs, batch_size=3)
    assert r["correct"] == sum(greedy for _, greedy in want)
    assert r["target_nll"] == pytest.approx(-np.mean([lp for lp, _ in want]), rel=1e-6)
    assert r["truncated"] == sum(len(c) + len(t) > CFG.context_length + 1 for c, t in pairs)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Path:
    d = tmp_path_factory.mktemp("run")
    cfg = config.config_from_dict({
        "model": config.config_to_dict(config.Config(model=CFG))["model"],
        "data": {"tokenizer": "byte", "cache_dir": str(d / "cache")},
    })
    return write_run(d, cfg, params, step=3)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptjax.eval", *args], cwd=ROOT,
                          env=process_env(),
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_cli_file_source_and_last_word(run_dir: Path, tmp_path: Path, params: dict) -> None:
    text = "def f(x):\n    return x + 1\n" * 12  # 336 bytes; the source adds one end-of-text
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "lw.jsonl").write_text(
        json.dumps({"context": "def f(x):\n    return", "target": " x"}) + "\n\n"
        + json.dumps({"context": "import o", "target": "s"}) + "\n")
    r = run_eval("--checkpoint", str(run_dir), "--data", str(tmp_path / "a.txt"), "--stride", "8",
                 "--last-word", str(tmp_path / "lw.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    p = out["perplexity"]
    assert out["step"] == 3 and p["split"] == "all" and p["stride"] == 8
    assert p["tokens"] == len(text)  # 336 bytes + end-of-text, less the unscored first token
    assert p["bytes"] == len(text) - 1  # the end-of-text is scored but stands for no bytes
    assert p["bits_per_byte"] == pytest.approx(p["loss"] * p["tokens"] / math.log(2) / p["bytes"])
    tokens = np.frombuffer(text.encode(), np.uint8).astype(np.uint16)
    want = ev.score_tokens(params, CFG, np.append(tokens, 256), stride=8)
    assert p["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert out["last_word"]["examples"] == 2
    human = run_eval("--checkpoint", str(run_dir), "--data", str(tmp_path / "a.txt"))
    assert human.returncode == 0, human.stderr
    assert "bits/byte" in human.stdout and "at stride 8\n" in human.stdout  # default: context // 2


@pytest.mark.slow
def test_cli_prompt_completion_scores_completions_only(run_dir: Path, tmp_path: Path) -> None:
    records = [{"prompt": f"Q: {i} + {i}?\nA:", "completion": f" {2 * i}"} for i in range(20)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run_eval("--checkpoint", str(run_dir), "--data", str(tmp_path / "qa.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["perplexity"]
    completions = [len(rec["completion"]) for rec in records]
    assert p["tokens"] == sum(completions) + len(records)  # each completion and its end-of-text
    assert p["bytes"] == sum(completions)


@pytest.mark.slow
def test_cli_default_is_validation_split(run_dir: Path) -> None:
    r = run_eval("--checkpoint", str(run_dir), "--max-tokens", "300", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["perplexity"]
    assert p["source"] == "stdlib" and p["split"] == "validation" and p["tokens"] == 299


@pytest.mark.parametrize("args,expect", [
    (["--stride", "99"], "--stride must be in [1, 16]"),
    (["--data", "/nonexistent/*.txt"], "matches no files"),
    (["--last-word", "/nonexistent.jsonl"], "cannot read /nonexistent.jsonl"),
])
def test_cli_errors_one_line(run_dir: Path, args: list[str], expect: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call_main(ev.main, ["--checkpoint", str(run_dir), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and out == "", (code, err)
    assert expect in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_error_as_a_process(run_dir: Path) -> None:
    """What `python -m gptjax.eval` prints and returns, past the process boundary."""
    r = run_eval("--checkpoint", str(run_dir), "--stride", "99")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--stride must be in [1, 16]" in r.stderr and "Traceback" not in r.stderr
