"""Run directories from and to Hugging Face GPT-2 directories, and `train.init_from=HF_DIR`.

    python -m gptjax.hf import HF_DIR --out runs/gpt2 [--tokenizer gpt2|byte]
    python -m gptjax.hf export RUN_DIR --out HF_DIR [--step N] [--force]

An imported run is an ordinary run directory (step 0, zero optimizer moments), so sample.py,
gptjax.eval and `train.init_from` take it; `train.init_from` also takes a Hugging Face directory
directly. The weight mapping itself is gpt2.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import yaml

from gptjax import checkpoint
from gptjax.cli import OneLineParser, nonneg_int, out_dir, run_cli, user_path
from gptjax.config import Config, config_from_dict, config_to_dict
from gptjax.errors import UserError, warn
from gptjax.hf.gpt2 import default_tokenizer, load_gpt2, save_gpt2
from gptjax.tokenizer import TOKENIZER_CLASSES
from gptjax.train import optim


def import_run(hf_dir: str | Path, out: str | Path, tokenizer: str | None = None) -> Config:
    """Writes a GPT-2 directory as a gptjax run directory (step 0) plus its `config.yaml`.

    The step holds zero Adam moments from the default optimizer, so the run is complete: train.py
    could resume it in place, though fine-tuning is meant to go through `train.init_from`
    (fresh optimizer with the fine-tuning run's own settings, a new run directory).
    """
    out = Path(out)
    if checkpoint.checkpoint_dir(out).is_dir() and any(checkpoint.checkpoint_dir(out).iterdir()):
        raise UserError(f"{out} already holds checkpoints; choose another --out")
    np_params, model_cfg = load_gpt2(hf_dir)
    tok = tokenizer or default_tokenizer(model_cfg.vocab_size)
    tok_vocab = TOKENIZER_CLASSES[tok].vocab_size
    if tok_vocab > model_cfg.vocab_size:
        # Still imported (its weights may be wanted); sampling and training will refuse the ids.
        warn(f"the {tok} tokenizer has {tok_vocab} ids but the model's vocabulary is "
                        f"{model_cfg.vocab_size}; no tokenizer of gptjax fits it")
    cfg = config_from_dict({
        "model": config_to_dict(Config(model=model_cfg))["model"],
        "data": {"tokenizer": tok},
        "train": {"run_dir": str(out)},
    })
    params = jax.tree.map(jax.numpy.asarray, np_params)
    opt_state = optim.make_optimizer(cfg.optim).init(params)
    # A data position at the start, so a resumed run starts its data from the beginning.
    data_state = {"seed": cfg.data.seed, "epoch": 0, "index": 0}
    meta = checkpoint.make_meta(cfg, 0, {"tokens": 0, "imported_from": str(Path(hf_dir))})
    ckpt = checkpoint.Checkpointer(out, async_save=False)
    try:
        ckpt.save(0, params, opt_state, data_state, meta)
    finally:
        ckpt.close()
    header = (f"# Imported from {hf_dir} by `python -m gptjax.hf import`. A starting point for\n"
              f"# fine-tuning: python train.py --config {out / 'config.yaml'} "
              f"train.init_from={out} train.run_dir=RUN data.source=...\n")
    (out / "config.yaml").write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return cfg


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None,
               force: bool = False) -> tuple[Path, int]:
    """Writes a run's parameters (latest step, or `step`) as a Hugging Face GPT-2 directory.

    Returns:
        (the directory, the step exported).
    """
    params, cfg, meta, step = checkpoint.load_params(run_dir, step)
    tok = meta.get("tokenizer", cfg.data.tokenizer)
    return save_gpt2(params, cfg.model, out, tokenizer=tok, force=force), step


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m gptjax.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    i = sub.add_parser("import", help="a Hugging Face GPT-2 directory -> a gptjax run directory")
    i.add_argument("hf_dir", metavar="HF_DIR", type=user_path, help="config.json + safetensors")
    i.add_argument("--out", required=True, metavar="RUN_DIR", type=out_dir)
    i.add_argument("--tokenizer", choices=("gpt2", "byte"),
                   help="recorded in the run (default: gpt2 for a vocabulary of 50257+, else byte)")
    e = sub.add_parser("export", help="a gptjax run directory -> a Hugging Face GPT-2 directory")
    e.add_argument("run_dir", metavar="RUN_DIR", type=user_path)
    e.add_argument("--out", required=True, metavar="HF_DIR", type=out_dir)
    e.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    e.add_argument("--force", action="store_true", help="overwrite a model already in HF_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    def body() -> None:
        if a.command == "import":
            cfg = import_run(a.hf_dir, a.out, a.tokenizer)
            m = cfg.model
            print(f"imported {a.hf_dir} -> {a.out} (step 0): {m.n_layer} layers, d_model "
                  f"{m.d_model}, {m.n_head} heads, context {m.context_length}, vocab "
                  f"{m.vocab_size}, tokenizer {cfg.data.tokenizer}; config in "
                  f"{Path(a.out) / 'config.yaml'}")
        else:
            out, step = export_run(a.run_dir, a.out, a.step, a.force)
            print(f"exported {a.run_dir} (step {step}) -> {out}")

    return run_cli("gptjax.hf", body)

