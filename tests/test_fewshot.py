"""Few-shot evaluation: task files, K-shot prompts, the batched scorer against a plain forward
pass, greedy completion, and the CLI's table, JSON and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import config, model
from gptjax.eval import fewshot
from gptjax.decode import generate
from gptjax.eval import scoring
from gptjax.errors import UserError
from gptjax.eval.tasks import Item, Task, fit_prompt, read_task, render, shot_indices
from gptjax.tokenizer import get_tokenizer

from helpers import process_env, run_main, tiny, write_run

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CFG = tiny(context_length=64, vocab_size=257, vocab_multiple=128)
TOK = get_tokenizer("byte")


@pytest.fixture(scope="module")
def params() -> dict:
    return model.init_params(CFG, jax.random.key(1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Path:
    d = tmp_path_factory.mktemp("run")
    cfg = config.config_from_dict({
        "model": config.config_to_dict(config.Config(model=CFG))["model"],
        "data": {"tokenizer": "byte", "cache_dir": str(d / "cache")},
    })
    return write_run(d, cfg, params, step=3)


@jax.jit
def _log_probs(params: dict, ids_1T: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(model.GPT(CFG).apply({"params": params}, ids_1T)[0], -1)


def direct_logprob(params: dict, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unbatched forward pass; right-padding to the context (one compile) changes nothing
    before it, the model being causal."""
    ids = ctx + cont
    padded = np.zeros((1, CFG.context_length), np.int32)
    padded[0, : len(ids) - 1] = ids[:-1]
    logp = np.asarray(_log_probs(params, padded))
    pos = range(len(ctx) - 1, len(ids) - 1)
    lp = sum(float(logp[p, t]) for p, t in zip(pos, cont))
    greedy = all(int(np.argmax(logp[p])) == t for p, t in zip(pos, cont))
    return lp, greedy


def test_loglikelihoods_equal_a_plain_forward_pass(params: dict) -> None:
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, n).tolist(), rng.integers(0, 256, m).tolist())
             for n, m in [(1, 1), (5, 3), (20, 2), (40, 20), (3, 9), (60, 4)]]
    greedy_ctx = [7, 8, 9]  # a continuation that is greedy by construction
    g = generate.generate(params, CFG, [greedy_ctx], max_new_tokens=3, temperature=0.0)[0]
    pairs.append((greedy_ctx, g))
    got = scoring.loglikelihoods(params, CFG, pairs, batch_size=1)  # several calls per bucket
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = direct_logprob(params, ctx, cont)
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4) and greedy == want_greedy
    assert got[-1][1] is True


def test_task_file_and_prompts(tmp_path: Path) -> None:
    task = read_task(DATA / "fewshot_completion.jsonl")
    assert task.name == "fewshot_completion" and task.kind == "completion"
    assert len(task.items) == 12 and (task.separator, task.delimiter) == ("\n\n", " ")
    (tmp_path / "h.jsonl").write_text('{"task": {"name": "qa", "separator": "\\n", "stop": "."}}\n'
                                      + (DATA / "fewshot_completion.jsonl").read_text())
    h = read_task(tmp_path / "h.jsonl", {"stop": "!", "delimiter": None})
    assert (h.name, h.separator, h.delimiter, h.stop) == ("qa", "\n", " ", "!")
    a = shot_indices(12, 3, seed=0, item=4, exclude_self=True)
    assert len(set(a)) == 3 and 4 not in a and a == shot_indices(12, 3, 0, 4, True)
    assert a != shot_indices(12, 3, 1, 4, True) or a != shot_indices(12, 3, 2, 4, True)
    shots = [task.items[j] for j in a]
    text = render(task, shots, task.items[4])
    assert text == "\n\n".join([f"{e.context} {e.target}" for e in shots] + ["say as:"])
    # Too long for the room: the examples farthest from the item go first.
    short, used = fit_prompt(task, shots, task.items[4], TOK.encode, len(text) - 1, "x")
    assert used == 2 and short == render(task, shots[1:], task.items[4])
    with pytest.raises(UserError, match="longer than the model's context"):
        fit_prompt(task, shots, task.items[4], TOK.encode, 3, "x")
    with pytest.raises(UserError, match="3 shots need at least 3"):
        shot_indices(3, 3, 0, 0, True)


def test_choice_accuracy_is_the_argmax_of_each_normalisation(params: dict) -> None:
    task = read_task(DATA / "fewshot_choice.jsonl")
    r = fewshot.evaluate(params, CFG, TOK, task, 1, setting=fewshot.Setting(unconditional=True))
    want = {"acc": [], "acc_sum": [], "acc_uncond": []}
    for i, item in enumerate(task.items):
        shots = [task.items[j] for j in shot_indices(len(task.items), 1, 0, i, True)]
        prompt = render(task, shots, item)
        lp = [direct_logprob(params, TOK.encode(prompt), TOK.encode(" " + c))[0]
              for c in item.choices]
        un = [direct_logprob(params, TOK.encode("Answer:"), TOK.encode(" " + c))[0]
              for c in item.choices]
        n = [len(c) + 1 for c in item.choices]
        for key, s in (("acc", [x / m for x, m in zip(lp, n)]), ("acc_sum", lp),
                       ("acc_uncond", [x - u for x, u in zip(lp, un)])):
            want[key].append(int(np.argmax(s)) == item.answer)
    for key, hits in want.items():
        assert r[key] == pytest.approx(np.mean(hits)), key
    assert r["n"] == 12 and r["shots_used_min"] == 1


def test_completion_is_greedy_exact_match(params: dict) -> None:
    contexts = [f"say {w}:" for w in ("a", "bb", "ccc", "dd")]
    outs = scoring.generate_texts(params, CFG, TOK, [TOK.encode(c) for c in contexts],
                                  max_new_tokens=6, stops=["\n"])
    items = []
    for i, (c, o) in enumerate(zip(contexts, outs)):
        right = " ".join(o.split()) or "?"
        items.append(Item(c, target=right if i % 2 == 0 else right + "x"))
    task = Task("t", "completion", tuple(items), path="t.jsonl")
    r = fewshot.evaluate(params, CFG, TOK, task, 0,
                         setting=fewshot.Setting(max_new_tokens=6))
    want = np.mean([" ".join(o.split()) == it.target for o, it in zip(outs, items)])
    assert r["acc"] == pytest.approx(want) and r["acc"] >= 0.25


BAD = {
    "json": ('{"context": "a", "target": "b"}\n{oops\n', ":2: not valid JSON"),
    "fields": ('{"context": "a"}\n', 'nonempty "target"'),
    "range": ('{"context": "a", "choices": ["x", "y"], "answer": 2}\n', '"answer" 2 is out of'),
    "empty": ('{"context": "a", "choices": [], "answer": 0}\n', '"choices" is empty'),
    "long": (json.dumps({"context": "x" * 80, "target": "y"}) + "\n",
             "longer than the model's context"),
    "mixed": ('{"context": "a", "target": "b"}\n{"context": "a", "choices": ["x"], "answer": 0}'
              '\n', "mixes multiple-choice and completion"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_files_are_one_line(case: str, run_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    text, expect = BAD[case]
    (tmp_path / "t.jsonl").write_text(text)
    code = fewshot.main(["--checkpoint", str(run_dir), "--task", str(tmp_path / "t.jsonl"),
                         "--shots", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expect in err, err
    assert err.startswith("gptjax.fewshot: error: ")


def test_cli_table_and_json(run_dir: Path) -> None:
    """`python -m gptjax.fewshot` as its main in this process (the process: the test below)."""
    r = run_main(fewshot.main, ["--checkpoint", str(run_dir), "--task",
                                str(DATA / "fewshot_choice.jsonl"), "--shots", "0,1,8",
                                "--limit", "6", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    runs = out["tasks"][0]["runs"]
    assert [x["k"] for x in runs] == [0, 1, 8] and all(x["n"] == 6 for x in runs)
    assert runs[2]["shots_used_min"] < 8  # 8 examples do not fit a 64-token context
    text = fewshot.table(out["tasks"], (0, 1, 8))
    assert "0-shot" in text and "8-shot" in text and "no more fit the context" in text
    assert f"{100 * runs[1]['acc']:.1f} ± {100 * runs[1]['acc_stderr']:.1f}" in text


@pytest.mark.slow
def test_cli_error_in_a_process(run_dir: Path, tmp_path: Path) -> None:
    """gptjax.fewshot started as a user starts it: a bad task file is one line and exit 2."""
    text, expect = BAD["empty"]
    (tmp_path / "t.jsonl").write_text(text)
    env = process_env()
    r = subprocess.run([sys.executable, "-m", "gptjax.fewshot", "--checkpoint", str(run_dir),
                        "--task", str(tmp_path / "t.jsonl"), "--shots", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
    assert r.stderr.startswith("gptjax.fewshot: error: ")


@pytest.mark.slow
def test_tasks_evaluated_during_training(tmp_path: Path) -> None:
    """train.fewshot_tasks: scored at each evaluation on parameters sharded over 2 devices,
    logged to metrics.jsonl; an unusable file warns and training goes on."""
    from test_train import loop_overrides, run_train, write_corpus

    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    run = tmp_path / "run"
    tasks = f"{DATA / 'fewshot_choice.jsonl'},{DATA / 'fewshot_completion.jsonl'}"
    r = run_train(loop_overrides(corpus, run, steps=12, **{
        "train.eval_every": 6, "train.fewshot_tasks": tasks, "train.fewshot_shots": 2,
        "mesh.data": 2}), devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    few = {x["step"]: x for x in recs if "fewshot/fewshot_choice/acc" in x}
    assert sorted(few) == [0, 6, 12]
    assert 0 <= few[12]["fewshot/fewshot_completion/acc"] <= 1
    assert "fewshot_choice 2-shot accuracy" in r.stdout + r.stderr
    bad = run_train(loop_overrides(corpus, tmp_path / "run2", steps=2, **{
        "train.eval_every": 2, "train.fewshot_tasks": str(tmp_path / "bad.jsonl")}))
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert bad.stderr.count("few-shot evaluation disabled") == 1


def test_fewshot_keys_are_checked() -> None:
    cfg = config.load_config("default", ["train.fewshot_tasks=a.jsonl,b.jsonl"])
    assert cfg.train.fewshot_tasks == ("a.jsonl", "b.jsonl") and cfg.train.fewshot_shots == 4
    with pytest.raises(UserError, match="train.fewshot_shots"):
        config.load_config("default", ["train.fewshot_shots=-1"])


def test_loglikelihood_bench_runs(capsys: pytest.CaptureFixture) -> None:
    from gptjax.bench.cli import main

    small = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.d_ff=64",
             "model.context_length=32", "model.local_window=8", "train.batch_size=2"]
    assert main(["loglikelihood", "--requests", "8", "--repeats", "1", "--json", *small]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score_tokens_per_s"] > 0 and out["forward_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["score_tokens_per_s"] / out["forward_tokens_per_s"])
