"""sample.py end to end on a tiny checkpoint made here; each user mistake: one line, exit 2.
sample.py's main runs in this process (the JIT's programs are shared between the tests); one
test starts it as a process, as a user does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptjax import config
from helpers import call_main, process_env, script, write_run

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config.config_from_dict({
        "model": {"vocab_size": 257, "context_length": 64, "n_layer": 2, "d_model": 32,
                  "n_head": 4, "d_ff": 64, "local_window": 8, "vocab_multiple": 128},
        "data": {"tokenizer": "byte"},
        "sample": {"max_new_tokens": MAX_NEW, "temperature": 0.9, "top_k": 50, "seed": 0},
    })
    d = tmp_path_factory.mktemp("run")
    return write_run(d, cfg, step=7)


def sample_process(*args: str) -> subprocess.CompletedProcess:
    # A plain single-device process, as a user would start it (not conftest's 8 devices).
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT,
                       env=process_env(),
                       capture_output=True, timeout=120)
    # Bytes decoded by hand: text mode would turn a sampled "\r" into "\n".
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    return r


@pytest.fixture
def sample(capsys: pytest.CaptureFixture[str]):
    """sample.py ARGS as its main in this process: a CompletedProcess-like result (pytest's
    capture keeps a sampled "\r" as it is, as the bytes of a process's stdout do)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        code, out, err = call_main(script("sample").main, list(args), capsys)
        return subprocess.CompletedProcess(["sample.py", *args], code, out, err)

    return run


@pytest.mark.slow
def test_streams_text_and_json_agree_in_a_process(run_dir: Path) -> None:
    """The one run as a process: what streams to a real stdout is the JSON's samples."""
    args = ["--checkpoint", str(run_dir), "--prompt", "def ", "--num-samples", "2", "--seed", "3"]
    text, js = sample_process(*args), sample_process(*args, "--json")
    assert text.returncode == 0 and js.returncode == 0, text.stderr + js.stderr
    samples = json.loads(js.stdout)["samples"]
    assert len(samples) == 2 and text.stderr == ""
    assert text.stdout == "".join(f"=== sample {i + 1}/2 ===\ndef {s['text']}\n"
                                  for i, s in enumerate(samples))


def test_streams_text_and_json_agree(run_dir: Path, sample) -> None:
    args = ["--checkpoint", str(run_dir), "--prompt", "def ", "--num-samples", "2", "--seed", "3"]
    text = sample(*args)
    assert text.returncode == 0, text.stderr
    js = sample(*args, "--json")
    assert js.returncode == 0, js.stderr
    record = json.loads(js.stdout)
    assert record["step"] == 7 and record["prompt"] == "def " and record["tokenizer"] == "byte"
    assert record["settings"]["max_new_tokens"] == MAX_NEW  # from the checkpoint's config
    assert record["settings"]["top_k"] == 50 and record["settings"]["seed"] == 3
    samples = record["samples"]
    assert len(samples) == 2 and samples[0]["text"] != samples[1]["text"]
    assert all(s["tokens"] == MAX_NEW and s["finish_reason"] == "length" for s in samples)
    # The streamed text (decoded in chunks) is the same samples, one after the other.
    expected = "".join(f"=== sample {i + 1}/2 ===\ndef {s['text']}\n"
                       for i, s in enumerate(samples))
    assert text.stdout == expected


def test_greedy_prompt_file_and_step(run_dir: Path, tmp_path: Path, sample) -> None:
    f = tmp_path / "few_shot.txt"
    f.write_text("# add ⇒ def add(a, b):\n# square ⇒ ")
    out = [sample("--checkpoint", str(run_dir), "--prompt-file", str(f), "--greedy", "--json",
                  "--step", "7", "--max-new-tokens", "5", "--seed", str(seed)) for seed in (0, 1)]
    assert all(o.returncode == 0 for o in out), out[0].stderr
    a, b = (json.loads(o.stdout) for o in out)
    assert a["prompt"] == f.read_text() and a["settings"]["temperature"] == 0.0
    assert a["samples"] == b["samples"]  # greedy ignores the seed
    assert a["samples"][0]["tokens"] <= 5


def test_more_new_tokens_than_the_context(run_dir: Path, sample) -> None:
    """The window slides: 150 new tokens from a model whose context is 64, streamed and not."""
    args = ["--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "150",
            "--seed", "1"]
    js, text = sample(*args, "--json"), sample(*args)
    assert js.returncode == 0 and text.returncode == 0, js.stderr + text.stderr
    s = json.loads(js.stdout)["samples"][0]
    assert s["tokens"] == 150 or s["finish_reason"] == "end_of_text"
    assert s["tokens"] > 64, "ended before the first slide: the test would not test it"
    assert text.stdout == "def " + s["text"] + "\n"


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "{missing}", "--prompt", "x"], "no checkpoint found"),
    (["--checkpoint", "{run}", "--prompt", ""], "the prompt is empty"),
    (["--checkpoint", "{run}", "--prompt", "a" * 70], "exceeds the context length of 64"),
    (["--checkpoint", "{run}", "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    (["--checkpoint", "{run}", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--checkpoint", "{run}", "--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
])
def test_bad_input_exits_2_with_one_line(run_dir: Path, tmp_path: Path, sample, args: list[str],
                                         message: str) -> None:
    args = [a.format(run=run_dir, missing=tmp_path / "nothing") for a in args]
    r = sample(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].startswith("sample.py: error: ")
