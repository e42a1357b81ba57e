"""Training as `train.py` runs it: the real input pipeline (token cache, windows, prefetch, the
device feed), the host loop with its logging, an evaluation and a checkpoint, timed from the
run's own log; what the train-step benchmark's synthetic batches leave out."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from gptjax.config import config_to_dict, load_config, replace_cfg
from gptjax.data.batches import pipeline_kind
from gptjax.errors import UserError
from gptjax.plot import metrics_records


def check_steps(steps: int, log_every: int) -> None:
    if steps < 2 * log_every:
        raise UserError(f"--steps {steps} must be at least twice --log-every {log_every}: the "
                        "first interval holds the compile and is not counted")


def bench_run(config: str, overrides: list[str], *, steps: int, batch: int | None,
              log_every: int, run_dir: str | None = None) -> dict[str, Any]:
    """Trains `steps` steps of `config` from scratch, evaluating and checkpointing at the end.

    Args:
        config, overrides: as train.py takes them.
        steps: optimizer steps (the schedule is the config's: the run is its first `steps`).
        batch: train.batch_size (default the config's).
        log_every: steps per timed interval.
        run_dir: where the run goes; default a temporary directory, removed afterwards.

    Returns:
        tokens/s over each log interval after the first (which holds the compile): their
        median and spread, and `loop_tokens_per_s`, the tokens of those intervals over their
        summed time. The trainer restarts its clock after an evaluation, so the intervals time
        training, the pipeline and the checkpoint write but not evaluation, which the run's
        `seconds` (wall time of the whole call: compile, evaluations, saves) includes.
    """
    # Here, not at the top: the trainer brings tensorboardX, which the GPU image lacks, and the
    # other benchmarks must run there without it.
    from gptjax.train import trainer

    check_steps(steps, log_every)
    base = load_config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="gptjax-bench-run-") as tmp:
        cfg = replace_cfg(base, train={
            "run_dir": run_dir or str(Path(tmp) / "run"), "steps": steps,
            "batch_size": batch or base.train.batch_size, "log_every": log_every,
            "eval_every": steps, "checkpoint_every": steps})
        if (Path(cfg.train.run_dir) / "checkpoints").exists():
            raise UserError(f"{cfg.train.run_dir} holds a run: the benchmark starts from scratch")
        summary = trainer.train(cfg, quiet=True)
        rows = metrics_records(cfg.train.run_dir)
    timed = [r for r in rows if r.get("tokens_per_s")][1:]
    # Each interval's tokens: the difference of the cumulative counts at its ends.
    ends = [r["tokens"] for r in rows if r.get("tokens_per_s")]
    spans = [b - a for a, b in zip(ends, ends[1:])]
    rates = [r["tokens_per_s"] for r in timed]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "config": config, "steps": summary["step"], "batch": cfg.train.batch_size,
        "seq": cfg.model.context_length, "microbatches": cfg.train.microbatches,
        "pipeline": pipeline_kind(cfg.data.pipeline), "log_every": log_every,
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_spread": max(rates) - min(rates),
        "loop_tokens_per_s": sum(spans) / sum(s / r for s, r in zip(spans, rates)),
        "mfu": statistics.median(mfus) if mfus else None,
        "intervals": len(rates), "seconds": summary["seconds"], "tokens": summary["tokens"],
        "val_losses": summary.get("val_losses"), "run_config": config_to_dict(cfg),
    }
