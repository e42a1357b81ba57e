"""What the tests share (kept small: the suite runs on 2 CPU cores): tiny configs; the commands'
`main(argv)` run in the test's process (a Python started per check costs seconds of JAX import
and compile; each command is still started as a process once, marked slow); and the tiny
trained run that conftest's `trained_run` fixture shares between the tests that read it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec

from gptjax import sharding
from gptjax.config import ModelConfig
from gptjax.tokenizer import Tokenizer


def tiny(**kw: object) -> ModelConfig:
    base = ModelConfig(
        vocab_size=101,
        context_length=48,
        n_layer=4,
        d_model=32,
        n_head=4,
        d_ff=64,
        attention_pattern=("dense", "local"),
        local_window=8,
        vocab_multiple=16,
    )
    return dataclasses.replace(base, **kw)


# Tests of the real GPT-2 BPE need tiktoken's r50k_base ranks; .ci/run points this variable at
# ../shared/data/r50k_base.tiktoken. Nothing is downloaded at test time.
needs_bpe = pytest.mark.skipif(
    not os.environ.get("GPTJAX_GPT2_BPE"),
    reason="GPTJAX_GPT2_BPE is not set (.ci/run sets it to ../shared/data/r50k_base.tiktoken)",
)


def mesh_specs(cfg: ModelConfig) -> object:
    """Mesh-axis PartitionSpecs of the parameters (what each array is split over)."""
    return jax.tree.map(
        lambda s: nn.logical_to_mesh_axes(tuple(s), sharding.RULES),
        sharding.param_specs(cfg),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


def write_corpus(d: Path) -> Path:
    """~120 KB of Python source as 30 .txt documents in `d` (deterministic)."""
    src = Path(json.__file__).parent  # any stdlib module's source will do
    text = "".join(p.read_text() for p in sorted(src.glob("*.py")))
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(text[i * 3000 : i * 3000 + 4000])
    return d


def write_run(d: Path, cfg: object, params: object = None, step: int = 0) -> Path:
    """A run directory holding `params` (default: fresh ones of cfg.model) at `step`, as the
    readers (sample.py, gptjax.eval, fewshot, the server, hf export) see a trained run; the
    optimizer state is a stand-in, which none of them reads."""
    import jax.numpy as jnp

    from gptjax import checkpoint, model

    if params is None:
        params = model.init_params(cfg.model, jax.random.key(0))
    c = checkpoint.Checkpointer(d, async_save=False)
    c.save(step, params, {"count": jnp.zeros((), jnp.int32)}, {}, checkpoint.make_meta(cfg, step))
    c.close()
    return d


def cudnn_as_xla(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stands in for cuDNN on this CPU: the backend counts as a GPU for the decoder's choice of
    kernel, and jax.nn.dot_product_attention runs its XLA version when asked for cuDNN. Returns
    the implementations asked for, call by call (traced calls), so a test can check that cuDNN
    was asked for at all."""
    from gptjax.model import attention

    real, asked = jax.nn.dot_product_attention, []

    def fake(*args, implementation=None, **kw):
        asked.append(implementation)
        return real(*args, implementation="xla" if implementation == "cudnn" else implementation,
                    **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(attention, "gpu_backend", lambda: True)
    return asked


# --------------------------------------------------------------------------- commands in-process

ROOT = Path(__file__).resolve().parent.parent


def script(name: str) -> Any:
    """train.py or sample.py, the scripts at the repository root, imported as modules (once per
    process), so a test can call their `main(argv)` without starting a Python."""
    import importlib.util
    import sys

    key = f"_gptjax_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def call_main(main: Callable[[list[str]], int | None], argv: list[str],
              capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`main(argv)` as its `python -m` / script entry point would run it: (exit code, stdout,
    stderr). An argparse error is SystemExit(2) from OneLineParser; run_cli returns the rest."""
    capsys.readouterr()  # what came before is not the command's
    try:
        code = main(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_main(main: Callable[[list[str]], int | None], argv: list[str],
             prog: str = "main") -> Any:
    """call_main without capsys: stdout and stderr redirected into strings. Returns a
    subprocess.CompletedProcess (args, returncode, stdout, stderr), as a test of the command
    run as a process would have."""
    import contextlib
    import io
    import subprocess

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess([prog, *argv], code, out.getvalue(), err.getvalue())


def process_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a process a test starts, with `extra` added: `devices` CPU devices
    (one, as a user's shell gives, not conftest's eight), and conftest's other XLA flags, which
    make compiles cheap, and its compile cache: the process compiles only what no test compiled
    before it."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices != 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONIOENCODING="utf-8", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def keep_xla_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py's main applies train.xla_flags (auto: the GPU flags) to XLA_FLAGS and refuses
    to once JAX's backends are up, as they are in the test process. Naming them in XLA_FLAGS
    already, as a user may, makes that a no-op: the run's config stays the user's."""
    from gptjax import xla_flags

    have = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", " ".join([have, *xla_flags.DEFAULT]).strip())


# --------------------------------------------------------------------------- the trained run


def loop_overrides(corpus: Path, run_dir: Path, steps: int = 24, **extra: object) -> list[str]:
    """train.py's overrides for a tiny run on `corpus` (write_corpus) into `run_dir`."""
    kv = {
        "data.source": f"{corpus}/*.txt",
        "data.cache_dir": str(run_dir.parent / "cache"),
        "data.val_fraction": 0.1,
        "model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.d_ff": 256,
        "model.context_length": 64, "model.local_window": 16,
        "optim.learning_rate": 3e-3, "optim.warmup_tokens": 2000, "optim.decay_tokens": 100000,
        "train.run_dir": str(run_dir), "train.batch_size": 8, "train.steps": steps,
        "train.log_every": 4, "train.eval_every": 12, "train.eval_batches": 2,
        "train.checkpoint_every": 8, "train.keep_checkpoints": 3, "mesh.data": 1,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


TRAINED_STEPS = 24  # checkpoints at 8, 16 and 24; validation at 0, 12 and 24


def train_shared_run(root: Path) -> tuple[Path, Path]:
    """(corpus, run): `loop_overrides(corpus, run, steps=TRAINED_STEPS)` trained once under
    `root`, in this process on one device, as train.py would (same config, so train.py resumes
    it). Every pytest-xdist worker that asks gets the same one: the first trains it under a file
    lock, the others wait and read it. Tests copy it (copy_run) before they change anything."""
    import fcntl

    from gptjax import config
    from gptjax.train import trainer

    root.mkdir(parents=True, exist_ok=True)
    corpus, run = root / "corpus", root / "run"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            corpus.mkdir(exist_ok=True)
            write_corpus(corpus)
            cfg = config.load_config("default", loop_overrides(corpus, run, steps=TRAINED_STEPS))
            trainer.train(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)
            (root / ".done").write_text("")
    return corpus, run


def copy_run(run: Path, to: Path) -> Path:
    """A writable copy of a run directory (the shared one is only read)."""
    import shutil

    shutil.copytree(run, to, ignore=shutil.ignore_patterns("*.lock", ".lock*"))
    return to


def train_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """train.py ARGS as its main in this process: (exit code, stderr). For runs that end
    before the first step (refusals): the mesh spans this process's 8 devices (mesh.data=-1;
    loop_overrides' mesh.data=1 is a 1-device process's), which a compile would pay for."""
    keep_xla_flags(monkeypatch)
    code, _, err = call_main(script("train").main, [*args, "mesh.data=-1"], capsys)
    return code, err


class InterruptAt:
    """Patches `module.name` (a tokenizer job function) to count its calls and raise
    KeyboardInterrupt (Ctrl-C) at call `n` while `armed`: a build stopped mid-way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, n: int) -> None:
        self.calls = 0
        self.armed = True
        real = getattr(module, name)

        def job(*args: Any) -> Any:
            self.calls += 1
            if self.armed and self.calls == n:
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(module, name, job)
