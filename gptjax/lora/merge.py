"""`python -m gptjax.lora merge RUN_DIR --out NEW_RUN_DIR [--step N]`: a LoRA run's adapters
folded into its base, written as an ordinary run directory (step as the LoRA run's, zero Adam
moments), which every tool reads as any other run and which needs no base beside it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gptjax.cli import OneLineParser, nonneg_int, out_dir, run_cli, user_path
from gptjax.config import Config, TrainConfig
from gptjax.errors import UserError
from gptjax.lora import adapters, runs


def merge_run(run_dir: str | Path, out: str | Path, step: int | None = None
              ) -> tuple[Config, int]:
    """Writes the merged run; returns (its config, the step merged)."""
    params, cfg, meta, step = runs.load_model(run_dir, step)
    if "lora" not in params:
        raise UserError(f"{run_dir} is not a LoRA run (train.lora_rank is 0 there)")
    merged = adapters.merge(params)
    plain = dataclasses.replace(cfg.train, run_dir=str(out), init_from="",
                                lora_rank=0, lora_targets=TrainConfig.lora_targets)
    cfg = dataclasses.replace(cfg, train=plain)
    runs.write_run(out, cfg, merged, step, {
        "tokenizer": meta.get("tokenizer", cfg.data.tokenizer),
        "merged_from": {"run": str(Path(run_dir).resolve()), "step": step,
                        runs.BASE_KEY: meta[runs.BASE_KEY]}})
    return cfg, step


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m gptjax.lora", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    m = sub.add_parser("merge", help="a LoRA run -> an ordinary run with the adapters folded in")
    m.add_argument("run_dir", metavar="RUN_DIR", type=user_path)
    m.add_argument("--out", required=True, metavar="NEW_RUN_DIR", type=out_dir)
    m.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    def body() -> None:
        _, step = merge_run(a.run_dir, a.out, a.step)
        print(f"merged {a.run_dir} (step {step}) -> {a.out}")

    return run_cli("python -m gptjax.lora", body)
