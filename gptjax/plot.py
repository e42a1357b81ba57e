"""Loss curves of training runs: training and validation loss against tokens seen, with the
learning rate in a panel below, one colour per run, read from each run's metrics.jsonl.

    python -m gptjax.plot RUN_DIR [RUN_DIR ...] --out FILE.png

Matplotlib (the `sweep` extra) is imported only when a figure is drawn, with the Agg backend,
so nothing here needs a display.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from gptjax.cli import OneLineParser, run_cli, user_path
from gptjax.errors import UserError


@dataclasses.dataclass
class Curves:
    """One run's metrics: (tokens, value) pairs, in step order."""

    name: str
    train: list[tuple[int, float]]  # training loss
    lr: list[tuple[int, float]]
    val: list[tuple[int, float]]  # validation loss


def metrics_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run directory's metrics.jsonl, in order, less lines cut short by a kill.
    OSError (FileNotFoundError: no such file) and UnicodeDecodeError pass through."""
    out = []
    for ln in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def read_metrics(run_dir: str | Path) -> Curves:
    """A run directory's metrics.jsonl as curves. Validation lines carry a step, not tokens: they
    take the tokens of the training line of the same step (0 before the first step).

    Raises:
      UserError: no such directory, no metrics.jsonl, or no loss in it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    try:
        records = metrics_records(run_dir)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (not a training run directory?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    tokens_at = {0: 0}
    train, lr, val_steps = [], [], []
    for rec in records:
        if "loss" in rec and "tokens" in rec:
            tokens_at[rec["step"]] = rec["tokens"]
            train.append((rec["tokens"], float(rec["loss"])))
            if "lr" in rec:
                lr.append((rec["tokens"], float(rec["lr"])))
        if "val_loss" in rec:
            val_steps.append((rec["step"], float(rec["val_loss"])))
    val = [(tokens_at[s], v) for s, v in val_steps if s in tokens_at]
    if not train and not val:
        raise UserError(f"{path} holds no training or validation loss")
    return Curves(run_dir.name or str(run_dir), train, lr, val)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        # Here, not at the top: matplotlib is an optional dependency (the `sweep` extra) that
        # training and sampling never need, and it is slow to import.
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[sweep]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): the backend is fixed on first import

    return plt


def save_figure(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    return out


def plot_runs(runs: list[Curves], out: str | Path) -> Path:
    """Draws the runs' curves into a PNG (loss above, learning rate below) and returns its path."""
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    try:
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            if run.train:
                ax_loss.plot(*zip(*run.train), color=color, alpha=0.5, lw=1,
                             label=f"{run.name} train")
            if run.val:
                ax_loss.plot(*zip(*run.val), color=color, marker="o", lw=2,
                             label=f"{run.name} validation")
            if run.lr:
                ax_lr.plot(*zip(*run.lr), color=color, lw=1)
        ax_loss.set_ylabel("loss (nats per token)")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend(fontsize="small")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("tokens")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, out)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m gptjax.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=user_path,
                   help="training run directories (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png", type=user_path,
                   help="the PNG to write")
    a = p.parse_args(argv)

    def body() -> int:
        path = plot_runs([read_metrics(d) for d in a.run_dirs], a.out)
        print(f"wrote {path}")
        return 0

    return run_cli("python -m gptjax.plot", body)


if __name__ == "__main__":
    sys.exit(main())
