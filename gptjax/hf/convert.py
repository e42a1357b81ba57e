"""Run directories from and to Hugging Face GPT-2 directories, and `train.init_from=HF_DIR`.

    python -m gptjax.hf import HF_DIR --out runs/gpt2 [--tokenizer gpt2|byte]
    python -m gptjax.hf import PEFT_DIR [--base BASE] --out runs/lora
    python -m gptjax.hf export RUN_DIR --out HF_DIR [--step N] [--force] [--merged]

An imported run is an ordinary run directory (step 0, zero optimizer moments), so sample.py,
gptjax.eval and `train.init_from` take it; `train.init_from` also takes a Hugging Face directory
directly. A PEFT LoRA directory imports as a LoRA run over BASE; a LoRA run exports as a PEFT
directory (or, --merged, as a GPT-2 with the adapters folded in). The mappings are gpt2.py and
peft.py.
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
from gptjax.hf import gpt2, peft
from gptjax.hf.gpt2 import default_tokenizer, load_gpt2, save_gpt2
from gptjax.lora import adapters, runs
from gptjax.lora.adapters import LoraSpec
from gptjax.model import param_shapes
from gptjax.sharding import with_shardings
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
               force: bool = False, merged: bool = False) -> tuple[Path, int, str | None]:
    """Writes a run's parameters (latest step, or `step`) as a Hugging Face GPT-2 directory; a
    LoRA run's adapters as a PEFT directory, or with `merged` folded into a GPT-2.

    Returns:
        (the directory, the step exported, a note for the user or None).
    """
    step, meta = checkpoint.read_meta(run_dir, step)
    if runs.is_lora(meta) and not merged:
        ad, cfg, meta, step = runs.read_adapters(run_dir, step)
        base = meta[runs.BASE_KEY]["path"]
        note = None
        if not gpt2.is_hf_dir(base):
            note = (f"the adapters' base is the gptjax run {base}; export it too (python -m "
                    f"gptjax.hf export {base} --out DIR) and load the adapters over DIR")
        return peft.write(ad, LoraSpec.of(cfg.train), cfg.model, out, base, force), step, note
    params, cfg, meta, step = runs.load_model(run_dir, step)
    params = adapters.merge(params)
    tok = meta.get("tokenizer", cfg.data.tokenizer)
    return save_gpt2(params, cfg.model, out, tokenizer=tok, force=force), step, None


def import_peft(peft_dir: str | Path, base: str | None, out: str | Path) -> Config:
    """Writes a PEFT LoRA directory as a LoRA run directory (step 0) over `base` (a GPT-2
    directory or a gptjax run; default the adapter config's base_model_name_or_path), plus its
    `config.yaml`."""
    where = str(Path(peft_dir) / peft.CONFIG_FILE)
    conf, tensors = peft.read(peft_dir)
    base = base or conf.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"{where}: base model {base!r} is not a local directory; pass --base "
                        "(a Hugging Face GPT-2 directory or a gptjax run directory)")
    if gpt2.is_hf_dir(base):
        model = gpt2.model_config_from_hf(gpt2.read_hf_config(base))
        tok = default_tokenizer(model.vocab_size)
        model_dict = config_to_dict(Config(model=model))["model"]
    else:
        meta = checkpoint.read_meta(base)[1]
        model_dict, tok = meta["config"]["model"], meta.get("tokenizer", "byte")
    pattern = list(model_dict.get("attention_pattern") or ["dense"])
    if any(kind != "dense" for kind in pattern):
        raise UserError(f"--base {base}: model.attention_pattern={','.join(pattern)} has banded "
                        "(local) layers; a PEFT adapter is for GPT-2, dense in every layer")
    # Target names resolve against the base's layers, as PEFT matches them.
    spec = peft.spec_of(conf, int(model_dict["n_layer"]), where)
    cfg = config_from_dict({"model": model_dict, "data": {"tokenizer": tok}, "train": {
        "run_dir": str(out), "init_from": str(base), "lora_rank": spec.rank,
        "lora_alpha": spec.alpha, "lora_targets": list(spec.targets),
        "lora_dropout": spec.dropout}})
    ad = peft.from_peft(tensors, spec, cfg.model, where)
    abstract = param_shapes(cfg.model)
    abstract = with_shardings(abstract, runs.one_device(abstract))
    base_params, step = runs.load_weights(str(base), cfg, abstract)
    runs.write_run(out, cfg, ad, 0, {"tokenizer": tok, "imported_from": str(peft_dir),
                                     runs.BASE_KEY: runs.base_reference(str(base), step,
                                                                        base_params)})
    header = (f"# Imported from the PEFT adapter {peft_dir} by `python -m gptjax.hf import`: a "
              f"LoRA run over\n# {base}. Resume training with python train.py --config "
              f"{Path(out) / 'config.yaml'} data.source=...\n")
    (Path(out) / "config.yaml").write_text(
        header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return cfg


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m gptjax.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    i = sub.add_parser("import", help="a Hugging Face GPT-2 directory -> a gptjax run directory; "
                                      "a PEFT LoRA directory -> a LoRA run")
    i.add_argument("hf_dir", metavar="HF_DIR", type=user_path,
                   help="config.json + safetensors, or adapter_config.json + "
                        "adapter_model.safetensors")
    i.add_argument("--base", metavar="BASE", type=user_path, default=None,
                   help="a PEFT directory's base: a GPT-2 directory or a gptjax run (default: "
                        "its base_model_name_or_path)")
    i.add_argument("--out", required=True, metavar="RUN_DIR", type=out_dir)
    i.add_argument("--tokenizer", choices=("gpt2", "byte"),
                   help="recorded in the run (default: gpt2 for a vocabulary of 50257+, else byte)")
    e = sub.add_parser("export", help="a gptjax run directory -> a Hugging Face GPT-2 directory")
    e.add_argument("run_dir", metavar="RUN_DIR", type=user_path)
    e.add_argument("--out", required=True, metavar="HF_DIR", type=out_dir)
    e.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    e.add_argument("--force", action="store_true", help="overwrite a model already in HF_DIR")
    e.add_argument("--merged", action="store_true",
                   help="a LoRA run: a GPT-2 with the adapters folded in (default: a PEFT "
                        "adapter directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    def body() -> None:
        if a.command == "import" and peft.is_peft_dir(a.hf_dir):
            cfg = import_peft(a.hf_dir, a.base, a.out)
            print(f"imported the LoRA adapter {a.hf_dir} -> {a.out} (step 0): "
                  f"{LoraSpec.of(cfg.train).describe()}, over {cfg.train.init_from}")
        elif a.command == "import":
            if a.base is not None:
                raise UserError(f"--base is for PEFT adapter directories; {a.hf_dir} has no "
                                f"{peft.CONFIG_FILE}")
            cfg = import_run(a.hf_dir, a.out, a.tokenizer)
            m = cfg.model
            print(f"imported {a.hf_dir} -> {a.out} (step 0): {m.n_layer} layers, d_model "
                  f"{m.d_model}, {m.n_head} heads, context {m.context_length}, vocab "
                  f"{m.vocab_size}, tokenizer {cfg.data.tokenizer}; config in "
                  f"{Path(a.out) / 'config.yaml'}")
        else:
            out, step, note = export_run(a.run_dir, a.out, a.step, a.force, a.merged)
            print(f"exported {a.run_dir} (step {step}) -> {out}")
            if note:
                print(f"note: {note}")

    return run_cli("gptjax.hf", body)

