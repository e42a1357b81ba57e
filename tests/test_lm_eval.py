"""The `gptjax` model for lm-evaluation-harness, offline: log-likelihoods and greedy flags equal
transformers' GPT2LMHeadModel on an imported GPT-2, rolling log-likelihoods equal gptjax.eval's
sliding windows, generation equals the sampler, and local YAML tasks run through lm-eval give
what gptjax.fewshot gives on the same items and prompts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The eval extra: `make test` installs it, so these tests always run there.
import lm_eval
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from gptjax.eval import perplexity as ev
from gptjax.eval import fewshot
from gptjax.hf import convert
from gptjax.eval import scoring
from gptjax.eval.tasks import read_task
from gptjax.eval.lm_eval import GptjaxLM
from helpers import process_env, run_main
from test_hf import make_hf

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CTX = 32
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
CLI_ARGS = ["--model", "gptjax", "--tasks", "gptjax_choice", "--include_path", "tests/data/lm_eval",
            "--limit", "4"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Hugging Face directory, the run directory imported from it); byte vocabulary."""
    d = tmp_path_factory.mktemp("lm")
    hf_dir = make_hf(d / "hf", ctx=CTX)
    convert.import_run(hf_dir, d / "run", tokenizer="byte")
    return hf_dir, d / "run"


@pytest.fixture(scope="module")
def lm(gpt2: tuple[Path, Path]) -> GptjaxLM:
    return GptjaxLM(checkpoint=str(gpt2[1]), batch_size=2)


def req(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_equals_transformers(gpt2: tuple[Path, Path], lm: GptjaxLM) -> None:
    rng = np.random.default_rng(0)
    words = ["def", " f(x)", ":", " return", " x", "\n", " + 1", "import", " os"]
    cases = [("".join(rng.choice(words, n)), "".join(rng.choice(words, m)))
             for n, m in [(1, 1), (3, 2), (6, 1), (2, 4), (8, 3)]]
    cases.append(("", "def"))  # empty context: end-of-text stands in
    cases.append(("x" * 40, " y"))  # longer than the context: its start is cut
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in cases])
    m = transformers.GPT2LMHeadModel.from_pretrained(gpt2[0]).eval()
    for (ctx, cont), (lp, greedy) in zip(cases, got):
        c, x = ([256], list(cont.encode())) if not ctx else (list(ctx.encode()),
                                                             list(cont.encode()))
        ids = (c + x)[-(CTX + 1):]
        with torch.no_grad():
            logits = m(torch.tensor([ids[:-1]])).logits[0]
        logp = torch.log_softmax(logits.double(), -1).numpy()
        pos = range(len(ids) - 1 - len(x), len(ids) - 1)
        want = sum(logp[p, t] for p, t in zip(pos, x))
        assert lp == pytest.approx(want, abs=1e-4, rel=1e-5)
        assert greedy == all(int(np.argmax(logp[p])) == t for p, t in zip(pos, x))
    # A continuation that is greedy by construction: its flag must be True.
    gen = lm.generate_until([req("generate_until", "def f", {"until": [], "max_gen_toks": 3})])
    ((_, greedy),) = lm.loglikelihood([req("loglikelihood", "def f", gen[0])])
    assert greedy and len(gen[0].encode()) == 3


def test_rolling_equals_sliding_window_total(lm: GptjaxLM) -> None:
    text = "def add(a, b):\n    return a + b\n" * 4  # 132 bytes, over 4 windows of 32
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    stream = np.array([256, *text.encode()], np.int32)  # first token predicted from end-of-text
    r = ev.score_tokens(lm.params, lm.cfg, stream, stride=CTX)
    assert r["tokens"] == len(text)
    assert got == pytest.approx(-r["loss"] * r["tokens"], rel=1e-5)


@pytest.mark.slow
def test_generate_until_stops_and_samples(lm: GptjaxLM) -> None:
    prompts = ["def f", "import", "class A:\n"]
    ids = [list(p.encode()) for p in prompts]
    greedy = lm.generate_until([req("generate_until", p, {"until": ["\n"], "max_gen_toks": 12,
                                                          "do_sample": False}) for p in prompts])
    want = scoring.generate_texts(lm.params, lm.cfg, lm.tok, ids, max_new_tokens=12,
                                  stops=["\n"])
    assert greedy == want and all("\n" not in g for g in greedy)
    sampled = lm.generate_until([req("generate_until", p, {"max_gen_toks": 8, "do_sample": True,
                                                           "temperature": 1.0}) for p in prompts])
    again = scoring.generate_texts(lm.params, lm.cfg, lm.tok, ids, max_new_tokens=8,
                                   temperature=1.0)
    assert sampled == again


@pytest.mark.slow
def test_local_tasks_match_fewshot(gpt2: tuple[Path, Path], lm: GptjaxLM,
                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """lm-eval's accuracy (unnormalised) and generations on the local YAML tasks equal
    gptjax.fewshot's on the same items and 0-shot prompts."""
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(ROOT)  # the YAML files name their data relative to the repository
    tm = TaskManager(include_path=str(DATA / "lm_eval"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["gptjax_choice", "gptjax_copy"],
                                  task_manager=tm, log_samples=True)
    choice = read_task(DATA / "fewshot_choice.jsonl")
    mine = fewshot.evaluate(lm.params, lm.cfg, lm.tok, choice, 0)
    assert out["results"]["gptjax_choice"]["acc,none"] == pytest.approx(mine["acc_sum"])
    copy = read_task(DATA / "fewshot_completion.jsonl")
    mine = fewshot.evaluate(lm.params, lm.cfg, lm.tok, copy, 0,
                            setting=fewshot.Setting(max_new_tokens=16))
    assert out["results"]["gptjax_copy"]["exact_match,none"] == pytest.approx(mine["acc"])
    gens = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["gptjax_copy"]}
    want = scoring.generate_texts(lm.params, lm.cfg, lm.tok,
                                  [lm.tok.encode(it.context) for it in copy.items],
                                  max_new_tokens=16, stops=["\n"])
    assert [gens[i] for i in range(len(want))] == want


@pytest.mark.slow
def test_cli_runs_lm_eval_with_gptjax(gpt2: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    """`python -m gptjax.lm_eval` as its main in this process (the process: the test below)."""
    from gptjax.eval.lm_eval import main

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # lm-eval's parser reads sys.argv
    monkeypatch.chdir(ROOT)
    r = run_main(main, [*CLI_ARGS, "--model_args", f"checkpoint={gpt2[1]},batch_size=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gptjax_choice" in r.stdout and "acc" in r.stdout


@pytest.mark.slow
def test_cli_error_in_a_process() -> None:
    env = process_env(**OFFLINE)
    r = subprocess.run([sys.executable, "-m", "gptjax.lm_eval", *CLI_ARGS, "--model_args",
                        "checkpoint=/nonexistent/run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "gptjax.lm_eval: error: " in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
