"""User mistakes at every entry point end with one line on stderr and exit code 2: no traceback,
nothing written. Each command's `main(argv)` runs in-process (what `python train.py ARGS` and
`python -m gptjax.X ARGS` run); one case per command also runs as a user starts it (a
subprocess, cwd at the repository root), as proof that the process boundary keeps the one line
and the exit code; config rules run in-process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy

from gptjax import config
from gptjax.hf import convert, gpt2
from gptjax.eval import perplexity as gptjax_eval
from gptjax.bench import cli as bench_cli
from gptjax.errors import ConfigError
from helpers import call_main, process_env, script, write_run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.steps=1", "train.batch_size=2", "train.eval_batches=1", "model.n_layer=2",
        "model.d_model=32", "model.n_head=2", "model.d_ff=64", "model.context_length=32",
        "model.local_window=8"]
DENSE = config.ModelConfig(vocab_size=257, context_length=32, n_layer=2, d_model=32, n_head=4,
                           d_ff=64, attention_pattern=("dense",))


def run(*args: str, home: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python ARGS` as a user would start it: one CPU device, not conftest's eight."""
    env = process_env()
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def in_process(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> tuple[int, str]:
    """`python COMMAND ARGS` run as its main(argv) in this process: (exit code, stderr)."""
    main = (script(command.removesuffix(".py")).main if command.endswith(".py")
            else {"gptjax.hf": convert.main, "gptjax.bench": bench_cli.main}[command])
    code, _, err = call_main(main, list(args), capsys)
    return code, err


def assert_one_line(r: subprocess.CompletedProcess | tuple[int, str] | str, prog: str,
                    *expect: str) -> str:
    """The error line (exit code 2, one stderr line starting `PROG: error: `, no traceback)."""
    if isinstance(r, tuple):
        code, stderr = r
        assert code == 2, (code, stderr)
    else:
        stderr = r if isinstance(r, str) else r.stderr
    if isinstance(r, subprocess.CompletedProcess):
        assert r.returncode == 2, (r.returncode, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory that takes no new entries (root may write anywhere but /proc)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o500)
        return d
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no unwritable directory to test with")
    return Path("/proc")


# --------------------------------------------------------------------------- 1, 2: config files


@pytest.mark.slow
def test_binary_config_file_in_a_process(tmp_path: Path) -> None:
    """train.py's one subprocess here: the exit code and the one line survive the process."""
    f = tmp_path / "x.yaml"
    f.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 300, dtype=np.uint8)))
    r = run("train.py", "--config", str(f), f"train.run_dir={tmp_path / 'run'}")
    assert_one_line(r, "train.py", str(f), "not valid UTF-8")
    assert not (tmp_path / "run").exists()


def test_binary_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x.yaml"
    f.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 300, dtype=np.uint8)))
    r = in_process(capsys, "train.py", "--config", str(f), f"train.run_dir={tmp_path / 'run'}")
    assert_one_line(r, "train.py", str(f), "not valid UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "null\n", "---\n~\n"])
def test_empty_config_file_is_an_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        config.load_config(f)


def test_empty_config_file_on_the_command_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("# all commented out\n")
    # --dry-run and TINY keep a regression (a silent run of the defaults) short.
    r = in_process(capsys, "train.py", "--config", str(f), "--dry-run", *TINY)
    assert_one_line(r, "train.py", f"{f} is empty")


# --------------------------------------------------------------------------- 3, 4: train.py flags


@pytest.mark.parametrize("args,expect", [
    (["--dry-run", "--mfu", "0"], "argument --mfu: must be in (0, 1], got 0"),
    (["--dry-run", "--mfu", "-1"], "argument --mfu: must be in (0, 1], got -1"),
    (["--dry-run", "--mfu", "nan"], "argument --mfu: must be in (0, 1], got nan"),
    (["--dry-run", "--mfu", "1.5"], "argument --mfu: must be in (0, 1]"),
    (["--coordinator", "host"], "argument --coordinator: expected HOST:PORT, got 'host'"),
    (["--coordinator", "host:abc", "--num-processes", "1", "--process-id", "0"],
     "argument --coordinator: the port must be a number in 1..65535, got 'abc'"),
    (["--coordinator", "host:70000"], "the port must be a number in 1..65535"),
    (["--coordinator", "host:1234", "--num-processes", "0"],
     "argument --num-processes: must be positive, got 0"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 is not in [0, 2)"),
    (["--num-processes", "2", "--process-id", "-1"], "argument --process-id: must be >= 0"),
])
def test_train_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                     expect: str) -> None:
    r = in_process(capsys, "train.py", *args, *TINY, f"train.run_dir={tmp_path / 'run'}")
    assert_one_line(r, "train.py", expect)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 5: seeds


def test_sample_seed_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before the checkpoint is read: no run is needed to see it.
    r = in_process(capsys, "sample.py", "--checkpoint", str(tmp_path), "--prompt", "x",
                   "--seed", "12345678901234567890123")
    assert_one_line(r, "sample.py", "--seed must be in [0, 4294967295]")


@pytest.mark.parametrize("key", ["train.seed", "data.seed", "sample.seed"])
@pytest.mark.parametrize("value", ["-1", "4294967296", "12345678901234567890123"])
def test_config_seeds_are_32_bit(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} must be in \[0, 4294967295\]"):
        config.load_config("default", [f"{key}={value}"])
    config.load_config("default", [f"{key}=4294967295"])


# --------------------------------------------------------------------------- 6: the benchmarks


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", [
    (["attention", "--seqs", "abc"], "argument --seqs: invalid int value: 'abc'"),
])
def test_bench_flags_in_a_process(args: list[str], expect: str) -> None:
    r = run("-m", "gptjax.bench", *args)
    assert_one_line(r, f"python -m gptjax.bench {args[0]}", expect)


@pytest.mark.parametrize("args,expect", [
    (["decode", "--batch-sizes", "x"], "argument --batch-sizes: invalid int value: 'x'"),
    (["train", "--steps", "0"], "argument --steps: must be positive, got 0"),
    (["train", "--compare-torch", "--torch-modes", "default,fast"],
     "argument --torch-modes: 'fast' is not one of default, max-autotune, eager"),
])
def test_bench_flags_of_the_process_cases(capsys: pytest.CaptureFixture[str], args: list[str],
                                          expect: str) -> None:
    """The rest of what used to run as processes: the same main, in this one."""
    assert_one_line(in_process(capsys, "gptjax.bench", *args),
                    f"python -m gptjax.bench {args[0]}", expect)


@pytest.mark.parametrize("args,expect", [
    (["train", "--batch", "0"], "argument --batch: must be positive, got 0"),
    (["train", "--seq", "-4"], "argument --seq: must be positive, got -4"),
    (["attention", "--window", "0"], "argument --window: must be positive"),
    (["attention", "--heads", "0"], "argument --heads: must be positive"),
    (["attention", "--head-dim", "-1"], "argument --head-dim: must be positive"),
    (["attention", "--batch", "0"], "argument --batch: must be positive"),
    (["attention", "--repeats", "0"], "argument --repeats: must be positive"),
    (["attention", "--seqs", "1024,0"], "argument --seqs: must be positive, got 0"),
    (["attention", "--seqs", "1024,,2048"], "argument --seqs: expected comma-separated"),
    (["decode", "--batch-sizes", "1,-2"], "argument --batch-sizes: must be positive"),
    (["decode", "--prompt-len", "0"], "argument --prompt-len: must be positive"),
    (["decode", "--new-tokens", "0"], "argument --new-tokens: must be positive"),
    (["torch", "--steps", "0"], "argument --steps: must be positive"),
    (["torch", "--batch", "0"], "argument --batch: must be positive"),
    (["run", "--steps", "0"], "argument --steps: must be positive"),
    (["run", "--log-every", "-1"], "argument --log-every: must be positive"),
    (["run", "--steps", "30", "--log-every", "20"], "--steps 30 must be at least twice"),
    (["data", "--seq", "0"], "argument --seq: must be positive"),
    (["data", "--batch", "x"], "argument --batch: invalid int value: 'x'"),
    (["nonsense"], "argument what: invalid choice"),
])
def test_bench_flags(capsys: pytest.CaptureFixture[str], args: list[str], expect: str) -> None:
    with pytest.raises(SystemExit) as e:
        bench_cli.main(args)
    assert e.value.code == 2
    prog = "python -m gptjax.bench" + ("" if args == ["nonsense"] else f" {args[0]}")
    assert_one_line(capsys.readouterr().err, prog, expect)


def test_bench_profile_into_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit):
        bench_cli.main(["train", "--profile", str(f), "--steps", "1", "--batch", "2", "--seq",
                        "32", "model.n_layer=2", "model.local_window=16"])
    assert_one_line(capsys.readouterr().err, "python -m gptjax.bench train",
                    f"argument --profile: {f} exists and is not a directory")


# --------------------------------------------------------------------------- the other commands


@pytest.mark.slow
@pytest.mark.parametrize("module,args,expect", [
    ("gptjax.plot", ["{tmp}/no-run", "--out", "{tmp}/x.png"], "does not exist"),
    ("gptjax.sweep", ["--sizes", "4by128", "--out", "{tmp}/sweep"], "argument --sizes"),
])
def test_other_commands_in_a_process(tmp_path: Path, module: str, args: list[str],
                                     expect: str) -> None:
    """The commands whose own tests call main(argv): one mistake each through a process."""
    r = run("-m", module, *(a.format(tmp=tmp_path) for a in args))
    assert_one_line(r, f"python -m {module}", expect)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------- 7: hf --out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 directory as transformers writes one (zeros: only the layout matters here)."""
    d = tmp_path_factory.mktemp("gpt2")
    tensors = {f"transformer.{k}": np.zeros(s, np.float32)
               for k, s in gpt2.expected_shapes(DENSE).items()}
    safetensors_numpy.save_file(tensors, str(d / gpt2.WEIGHTS_FILE))
    (d / gpt2.CONFIG_FILE).write_text(json.dumps(gpt2.hf_config_from_model(DENSE)))
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a dense (exportable) model at step 0."""
    cfg = config.Config(model=DENSE)
    d = tmp_path_factory.mktemp("run")
    return write_run(d, cfg, step=0)


@pytest.mark.parametrize("command", ["import", "export"])
@pytest.mark.parametrize("where", ["file", "under-a-file", "unwritable"])
def test_hf_out_that_cannot_be_written(hf_dir: Path, run_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], command: str,
                                       where: str) -> None:
    f = tmp_path / "a-file"
    f.write_text("keep me\n")
    out = {"file": f, "under-a-file": f / "sub",
           "unwritable": unwritable_dir(tmp_path) / "gptjax-out"}[where]
    expect = {"file": f"{f} exists and is not a directory",
              "under-a-file": f"{f} is not a directory",
              "unwritable": f"cannot write in {out.parent}"}[where]
    source = hf_dir if command == "import" else run_dir
    r = in_process(capsys, "gptjax.hf", command, str(source), "--out", str(out))
    assert_one_line(r, f"python -m gptjax.hf {command}", "argument --out: ", expect)
    assert f.read_text() == "keep me\n" and (out == f or not out.exists())


@pytest.mark.slow
def test_hf_out_that_cannot_be_written_in_a_process(hf_dir: Path, tmp_path: Path) -> None:
    """gptjax.hf's one subprocess here (import into a file)."""
    f = tmp_path / "a-file"
    f.write_text("keep me\n")
    r = run("-m", "gptjax.hf", "import", str(hf_dir), "--out", str(f))
    assert_one_line(r, "python -m gptjax.hf import", "argument --out: ",
                    f"{f} exists and is not a directory")
    assert f.read_text() == "keep me\n"


# --------------------------------------------------------------------------- 8: data.num_workers


def test_num_workers_is_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"data.num_workers must be in \[0, 1024\]"):
        config.load_config("default", ["data.num_workers=1025"])
    assert config.load_config("default", ["data.num_workers=1024"]).data.num_workers == 1024
    r = in_process(capsys, "train.py", *TINY, "data.num_workers=100000", f"train.run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line(r, "train.py", "data.num_workers must be in [0, 1024]", "got 100000")


# --------------------------------------------------------------------------- 9: ~ in paths


def test_config_expands_home_in_every_path_key(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.load_config("default", [
        "train.run_dir=~/run", "train.init_from=~/gpt2", "data.cache_dir=~/cache",
        "data.tfds_data_dir=~/tfds", "data.source=~/a/*.txt, b/*.jsonl,~/c/**/*.txt"])
    recorded = config.config_to_dict(cfg)
    assert recorded["train"]["run_dir"] == f"{tmp_path}/run"
    assert recorded["train"]["init_from"] == f"{tmp_path}/gpt2"
    assert recorded["data"]["cache_dir"] == f"{tmp_path}/cache"
    assert recorded["data"]["tfds_data_dir"] == f"{tmp_path}/tfds"
    assert recorded["data"]["source"] == f"{tmp_path}/a/*.txt, b/*.jsonl,{tmp_path}/c/**/*.txt"
    # Built from Python too, not only from files and overrides.
    assert config.TrainConfig(run_dir="~/x").run_dir == f"{tmp_path}/x"
    assert config.load_config("default", ["data.source=stdlib"]).data.source == "stdlib"


def test_config_file_path_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("train:\n  steps: 7\n")
    assert config.load_config("~/mine.yaml").train.steps == 7


def test_cli_paths_expand_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    a = script("sample").parse_args(["--checkpoint=~/run", "--prompt-file=~/p.txt"])
    assert (a.checkpoint, a.prompt_file) == (f"{tmp_path}/run", f"{tmp_path}/p.txt")
    a = gptjax_eval.parse_args(["--checkpoint=~/run", "--last-word=~/lw.jsonl"])
    assert (a.checkpoint, a.last_word) == (f"{tmp_path}/run", f"{tmp_path}/lw.jsonl")
    a = convert._parser().parse_args(["import", "~/gpt2", "--out=~/run"])
    assert (a.hf_dir, a.out) == (f"{tmp_path}/gpt2", f"{tmp_path}/run")
    a = convert._parser().parse_args(["export", "~/run", "--out=~/gpt2"])
    assert (a.run_dir, a.out) == (f"{tmp_path}/run", f"{tmp_path}/gpt2")


@pytest.mark.slow
def test_sample_checkpoint_names_the_expanded_path(tmp_path: Path) -> None:
    """sample.py's one subprocess here: HOME from the environment the process starts with."""
    r = run("sample.py", "--checkpoint=~/no-run", "--prompt", "x", home=tmp_path)
    assert_one_line(r, "sample.py", f"{tmp_path}/no-run")


def test_sample_checkpoint_names_the_expanded_path_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    r = in_process(capsys, "sample.py", "--checkpoint=~/no-run", "--prompt", "x")
    assert_one_line(r, "sample.py", f"{tmp_path}/no-run")


@pytest.mark.slow
def test_run_dir_under_home_makes_no_tilde_directory(tmp_path: Path) -> None:
    """A whole (1-step) run in a process of one device, as a user starts it."""
    # cwd is a scratch directory, so the unfixed code's `./~` lands there, not in the repository.
    work = tmp_path / "cwd"
    work.mkdir()
    r = run(str(ROOT / "train.py"), *TINY, "model.attention_pattern=dense",
            "train.run_dir=~/run", "data.cache_dir=~/cache", home=tmp_path, cwd=work)
    assert r.returncode == 0, r.stderr
    assert not (work / "~").exists() and not (ROOT / "~").exists()
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "cache").is_dir()


# --------------------------------------------------------------------------- 10: other config keys


@pytest.mark.parametrize("overrides,expect", [
    (["train.run_dir="], "train.run_dir must not be empty"),
    (["data.cache_dir="], "data.cache_dir must not be empty"),
    (["data.source="], "data.source must not be empty"),
    (["data.text_key="], "data.text_key must not be empty"),
    (["data.train_split="], "data.train_split must not be empty"),
    (["data.val_split= "], "data.val_split must not be empty"),
    (["train.steps=0", "train.total_tokens=0"],
     "train.steps and train.total_tokens are both 0: nothing to train"),
    (["train.steps=1e30"], "train.steps must fit in 64 bits"),
    (["model.n_layer=1e30"], "model.n_layer must fit in 64 bits"),
    (["mesh.fsdp=1e30"], "mesh.fsdp must fit in 64 bits"),
    (["sample.max_new_tokens=1e30"], "sample.max_new_tokens must fit in 64 bits"),
    (["sample.temperature=nan"], "sample.temperature must be >= 0 and finite"),
    (["sample.top_p=inf"], "sample.top_p must be in (0, 1]"),
    (["optim.learning_rate=nan"], "optim.learning_rate must be a finite number"),
    (["data.prefetch=-1"], "data.prefetch must be >= 0"),
])
def test_other_config_rules(overrides: list[str], expect: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(expect)):
        config.load_config("default", overrides)
