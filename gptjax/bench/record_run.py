"""A finished training run as a results row: its validation losses and tokens from the run's
metrics.jsonl, the wall time `train.py` printed (`done: ... in S s`), the config and the loss
on the whole validation split (non-overlapping windows) of the latest checkpoint, and the
provenance of this checkout and machine, appended to a results file.

    python -m gptjax.bench.record_run runs/default --seconds 212 --command 'python train.py' \
        --sample runs/default/sample.txt --out results/demo-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from gptjax.bench.provenance import provenance
from gptjax.bench.stdlib_words import known_share, stdlib_words
from gptjax.checkpoint import load_params
from gptjax.config import config_to_dict
from gptjax.eval.perplexity import load_eval_tokens, score_tokens
from gptjax.plot import metrics_records


def run_row(run_dir: Path, seconds: float, command: str, sample: Path | None = None) -> dict:
    rows = metrics_records(run_dir)
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    rates = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")][1:]  # after the compile
    params, cfg, _, _ = load_params(run_dir)  # the latest checkpoint: weights and config
    tokens, weights, _, _ = load_eval_tokens(cfg, None, None)
    full = score_tokens(params, cfg.model, tokens, weights=weights,
                        stride=cfg.model.context_length)
    args = shlex.split(command)
    extra = {}
    if sample is not None:  # what sample.py wrote, and how much of it is stdlib vocabulary
        text = sample.read_text()
        share, n, unknown = known_share(text, stdlib_words())
        extra = {"sample": text, "sample_words": n, "sample_known_share": share}
    return {**extra, "run_dir": str(run_dir), "steps": steps[-1]["step"], "tokens": steps[-1]["tokens"],
            "seconds": seconds, "val_losses": evals, "final_val_loss": evals[-1][1],
            "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
            "full_split_val_loss": full["loss"], "full_split_tokens": full["tokens"],
            "config": config_to_dict(cfg),
            "provenance": provenance(args[1:], prog=args[0])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptjax.bench.record_run",
                                description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--seconds", type=float, required=True, help="what train.py printed")
    p.add_argument("--command", required=True, help="the command that trained the run")
    p.add_argument("--out", type=Path, required=True, help="results file to append to")
    p.add_argument("--sample", type=Path, help="a sample of the run (sample.py's output)")
    a = p.parse_args(argv)
    row = run_row(a.run_dir, a.seconds, a.command, a.sample)
    with a.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{a.out}: step {row['steps']}, val loss {row['final_val_loss']:.4f}, "
          f"{row['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
