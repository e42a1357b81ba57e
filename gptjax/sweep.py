"""A scaling sweep: train a grid of model sizes at several compute budgets, record the final
validation loss against compute, and fit L(C) = a·C^-b + c over the compute-efficient frontier
(Kaplan et al. 2020; section 3 of the GPT-3 paper), to pick the size to train for a budget.

    python -m gptjax.sweep [--config BASE] [--sizes 2x64,4x128] [--budgets 1e12,1e13]
        [--time-budget MIN] --out DIR [section.key=value ...]

Each point (size, budget) is a run directory DIR/runs/SIZE_C<budget>; its steps follow from its
budget (C = 6·N·D, N the model's matmul parameters, D tokens). A point already in
DIR/points.jsonl is not trained again and a run cut short resumes from its checkpoint, so
rerunning the sweep finishes it. Writes DIR/points.jsonl, DIR/fit.json and DIR/sweep.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptjax import plot
from gptjax.bench.provenance import provenance
from gptjax.cli import OneLineParser, out_dir, run_cli
from gptjax.config import Config, load_config, replace_cfg
from gptjax.errors import UserError
from gptjax.model import matmul_params
from gptjax.train.trainer import train

HEAD_DIM = 64  # heads = d_model / 64 (at least one), as in GPT-3's smaller models
DEFAULT_SIZES = "2x64,2x128,4x128,4x192,4x256"
DEFAULT_BUDGETS = "2e12,6e12,2e13"


@dataclasses.dataclass(frozen=True)
class Size:
    """A model size `LxD`: L layers of width D (heads of 64, MLP of 4·D)."""

    n_layer: int
    d_model: int

    @property
    def name(self) -> str:
        return f"{self.n_layer}x{self.d_model}"

    def model_fields(self) -> dict[str, int]:
        n_head = max(1, self.d_model // HEAD_DIM)
        return {"n_layer": self.n_layer, "d_model": self.d_model, "n_head": n_head,
                "d_ff": 4 * self.d_model}


def parse_sizes(text: str) -> tuple[Size, ...]:
    """`2x64,4x128` → sizes; a `type=` for argparse."""
    out = []
    for item in text.split(","):
        layers, x, width = item.strip().lower().partition("x")
        if not x or not layers.isdigit() or not width.isdigit() or not int(layers) or not int(width):
            raise argparse.ArgumentTypeError(f"a size is LAYERSxD_MODEL such as 4x128, got {item!r}")
        out.append(Size(int(layers), int(width)))
    return tuple(out)


def parse_budgets(text: str) -> tuple[float, ...]:
    """`1e12,3e12` → FLOP budgets; a `type=` for argparse."""
    try:
        out = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are FLOPs such as 1e12,3e12, got {text!r}") from None
    if not all(math.isfinite(b) and b > 0 for b in out):
        raise argparse.ArgumentTypeError(f"budgets must be positive and finite, got {text!r}")
    return out


def point_config(base: Config, size: Size, budget: float, out: Path) -> Config:
    """The run of one point: the base config at this size, trained for the steps its budget buys,
    the learning-rate schedule fitted to that length (decay over the whole run, as Chinchilla
    found best), evaluated and checkpointed at the end and halfway."""
    cfg = replace_cfg(base, model=size.model_fields())
    cfg.model.check()
    tokens_per_step = cfg.train.batch_size * cfg.model.context_length
    steps = max(1, round(budget / (6 * matmul_params(cfg.model) * tokens_per_step)))
    tokens = steps * tokens_per_step
    run_dir = out / "runs" / f"{size.name}_C{budget:.3g}"
    return replace_cfg(
        cfg,
        train={"steps": steps, "run_dir": str(run_dir), "eval_every": steps,
               "checkpoint_every": max(1, steps // 2), "log_every": max(1, steps // 5)},
        optim={"warmup_tokens": min(cfg.optim.warmup_tokens, tokens // 10),
               "decay_tokens": tokens, "ramp_tokens": 0},
    )


def read_points(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill: that point trains (resumes) again
    return out


def _logged_val_losses(cfg: Config) -> list[tuple[int, float]]:
    """(step, validation loss) from a run's metrics.jsonl: a point whose run finished but whose
    line in points.jsonl was lost resumes at its last step and evaluates nothing."""
    try:
        records = plot.metrics_records(cfg.train.run_dir)
    except FileNotFoundError:
        return []
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def run_point(cfg: Config, size: Size, budget: float) -> dict[str, Any]:
    """Trains (or resumes) one point; returns its record for points.jsonl."""
    t0 = time.perf_counter()
    summary = train(cfg, quiet=True)
    seconds = time.perf_counter() - t0
    if summary.get("preempted"):
        # Stopped by a signal, saved: the point is unfinished, and so is the sweep.
        raise KeyboardInterrupt
    losses = summary.get("val_losses") or _logged_val_losses(cfg)
    if not losses or losses[-1][0] != cfg.train.steps:
        raise UserError(f"{cfg.train.run_dir}: no validation loss at step {cfg.train.steps} "
                        "(does data.source have a validation split?)")
    n = matmul_params(cfg.model)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.context_length
    return {"size": size.name, "n_layer": size.n_layer, "d_model": size.d_model, "params": n,
            "budget": budget, "flops": 6.0 * n * tokens, "tokens": tokens,
            "steps": cfg.train.steps, "val_loss": losses[-1][1],
            "seconds": seconds, "resumed": summary["start_step"] > 0,
            "run_dir": cfg.train.run_dir}


def run_sweep(base: Config, sizes: tuple[Size, ...], budgets: tuple[float, ...], out: Path,
              time_budget_min: float | None = None, record: dict[str, Any] | None = None
              ) -> list[dict[str, Any]]:
    """Trains every point not yet in out/points.jsonl, cheapest first, within the time budget
    (a point whose predicted time, from the FLOP/s measured so far, would overrun it is skipped
    with a note); returns every recorded point. `record` (the sweep's provenance: commit,
    machine, versions, command) goes with each new point, dated when the point finished."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "points.jsonl"
    done = {(p["size"], p["budget"]) for p in read_points(path)}
    todo = sorted(((point_config(base, s, b, out), s, b) for s in sizes for b in budgets),
                  key=lambda t: t[2])
    t0, flops_done, secs_done, skipped = time.perf_counter(), 0.0, 0.0, []
    bar = tqdm(total=len(todo), unit="run", desc="sweep", dynamic_ncols=True)
    for cfg, size, budget in todo:
        bar.set_postfix_str(f"{size.name} at {budget:.3g} FLOPs")
        if (size.name, budget) in done:
            bar.update(1)
            continue
        if time_budget_min is not None:
            left = 60 * time_budget_min - (time.perf_counter() - t0)
            rate = flops_done / secs_done if secs_done else None
            if left <= 0 or (rate and budget / rate > left):
                skipped.append(f"{size.name} at {budget:.3g}")
                bar.update(1)
                continue
        rec = run_point(cfg, size, budget)
        if record is not None:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            rec["provenance"] = {**record, "date": now}
        flops_done, secs_done = flops_done + rec["flops"], secs_done + rec["seconds"]
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(1)
    bar.close()
    if skipped:
        print(f"time budget of {time_budget_min} min: skipped {len(skipped)} point(s) "
              f"({', '.join(skipped)}); rerun with more time to add them")
    return read_points(path)


# --- the fit -------------------------------------------------------------------------------------


def best_by_budget(points: list[dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """The point of lowest final validation loss at each budget, by budget."""
    best: dict[float, dict[str, Any]] = {}
    for p in points:
        if p["budget"] not in best or p["val_loss"] < best[p["budget"]]["val_loss"]:
            best[p["budget"]] = p
    return dict(sorted(best.items()))


def frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The compute-efficient frontier: at each budget, the point of lowest loss, and only where
    no cheaper budget reached a lower loss (the frontier never rises with compute)."""
    out, lowest = [], math.inf
    for p in best_by_budget(points).values():
        if p["val_loss"] < lowest:
            out.append(p)
            lowest = p["val_loss"]
    return out


def _loglinear(x: np.ndarray, y: np.ndarray, c: float) -> tuple[float, float, float]:
    """Least squares of log(y - c) = log a' - b·x (x = log C/C0); (a', b, squared error in y)."""
    slope, intercept = np.polyfit(x, np.log(y - c), 1)
    pred = np.exp(intercept + slope * x) + c
    return float(np.exp(intercept)), float(-slope), float(np.sum((pred - y) ** 2))


def fit_power_law(compute: list[float], loss: list[float], use_scipy: bool | None = None
                  ) -> dict[str, Any]:
    """Fits loss = a·compute^-b + c. With fewer than 3 points c is fixed at 0 (two points fix a
    power law exactly). Otherwise a grid over c in [0, min loss) with a linear fit in log space
    for each (our own least squares), refined by scipy.optimize.curve_fit when scipy is
    installed (use_scipy None: if importable).

    Returns:
      {"a", "b", "c", "method", "points"}; a is for compute in FLOPs.
    """
    C, L = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
    if len(C) < 2 or len(set(C.tolist())) < 2:
        raise UserError("the fit needs points at two or more compute budgets")
    C0 = float(np.exp(np.mean(np.log(C))))  # fit in C / C0: keeps a' near the losses' scale
    x = np.log(C / C0)
    if len(C) < 3:
        a0, b, _ = _loglinear(x, L, 0.0)
        c, method = 0.0, "log-linear, c fixed at 0 (fewer than 3 frontier points)"
    else:
        grid = float(L.min()) * (1 - np.geomspace(1.0, 1e-4, 400))  # c from 0 up to min loss
        fits = [(_loglinear(x, L, c), c) for c in grid]
        (a0, b, _), c = min(fits, key=lambda f: f[0][2])
        method = "grid over c + log-linear least squares"
        if use_scipy is None or use_scipy:
            a0, b, c, method = _refine_scipy(x, L, a0, b, c, method, required=bool(use_scipy))
        if len(C) == 3:
            method += " (3 points fix 3 parameters: the curve passes through them)"
    return {"a": a0 * C0**b, "b": b, "c": c, "method": method, "points": len(C)}


def _refine_scipy(x: np.ndarray, L: np.ndarray, a0: float, b: float, c: float, method: str,
                  required: bool) -> tuple[float, float, float, str]:
    try:
        # Here, not at the top: scipy is optional; without it the grid fit stands.
        from scipy.optimize import OptimizeWarning, curve_fit
    except ImportError:
        if required:
            raise UserError("use_scipy=True but scipy is not installed") from None
        return a0, b, c, method
    try:
        with warnings.catch_warnings():  # three points leave no covariance to estimate: fine
            warnings.simplefilter("ignore", OptimizeWarning)
            (a1, b1, c1), _ = curve_fit(lambda x, a, b, c: a * np.exp(-b * x) + c, x, L,
                                        p0=(a0, b, c), maxfev=20000)
    except RuntimeError:  # no convergence: keep the grid's answer
        return a0, b, c, method
    return float(a1), float(b1), float(c1), "scipy.optimize.curve_fit from the grid fit"


def plot_sweep(points: list[dict[str, Any]], fit: dict[str, Any] | None, out: Path) -> Path:
    """Loss against compute (log-log), one curve per size, the frontier and the fit."""
    plt = plot.pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    try:
        for i, size in enumerate(sorted({p["size"] for p in points},
                                        key=lambda s: [int(v) for v in s.split("x")])):
            pts = sorted((p["flops"], p["val_loss"]) for p in points if p["size"] == size)
            ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=size)
        front = frontier(points)
        ax.plot([p["flops"] for p in front], [p["val_loss"] for p in front], "k*", ms=12,
                label="frontier")
        if fit is not None:
            C = np.geomspace(min(p["flops"] for p in points), max(p["flops"] for p in points))
            ax.plot(C, fit["a"] * C ** -fit["b"] + fit["c"], "k--",
                    label=f"L = {fit['a']:.3g}·C^-{fit['b']:.3f} + {fit['c']:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = plt.FuncFormatter(lambda v, _: f"{v:.3g}")  # not 5.4×10^0 on a narrow range
        ax.yaxis.set_major_locator(plt.MaxNLocator(8))  # 1.4, 1.6, … (not just 2 and 3)
        ax.yaxis.set_minor_locator(plt.NullLocator())
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("compute (6·N·D FLOPs)")
        ax.set_ylabel("final validation loss (nats per token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        fig.tight_layout()
        return plot.save_figure(fig, out)
    finally:
        plt.close(fig)


def report(points: list[dict[str, Any]], out: Path) -> dict[str, Any] | None:
    """fit.json, sweep.png and the best size per budget on stdout; returns the fit."""
    if not points:
        print("no points trained yet: nothing to fit")
        return None
    front = frontier(points)
    fit = None
    if len({p["budget"] for p in front}) >= 2:
        fit = fit_power_law([p["flops"] for p in front], [p["val_loss"] for p in front])
        fit["frontier"] = [{k: p[k] for k in ("size", "budget", "flops", "val_loss")}
                           for p in front]
        (out / "fit.json").write_text(json.dumps(fit, indent=1) + "\n", encoding="utf-8")
        print(f"fit over the frontier ({fit['method']}): "
              f"L(C) = {fit['a']:.4g}·C^-{fit['b']:.4f} + {fit['c']:.4f}")
    else:
        print("the frontier spans fewer than 2 budgets: no fit")
    print(f"plot: {plot_sweep(points, fit, out / 'sweep.png')}")
    for budget, p in best_by_budget(points).items():
        print(f"budget {budget:.3g} FLOPs: best {p['size']} ({p['params'] / 1e6:.2f}M params, "
              f"{p['steps']} steps) val loss {p['val_loss']:.4f}, {p['seconds']:.0f} s")
    return fit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptjax.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default", metavar="NAME_OR_PATH",
                   help="the base config (data, optimizer, batch, context); default `default`")
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                   help=f"model sizes LAYERSxD_MODEL, comma-separated; default {DEFAULT_SIZES}")
    p.add_argument("--budgets", type=parse_budgets, default=parse_budgets(DEFAULT_BUDGETS),
                   help=f"compute budgets in FLOPs (6·N·D), comma-separated; default "
                        f"{DEFAULT_BUDGETS}")
    p.add_argument("--time-budget", type=float, metavar="MIN",
                   help="stop starting points after this many minutes (skipped points are named)")
    p.add_argument("--out", required=True, type=out_dir, metavar="DIR",
                   help="the sweep directory: runs/, points.jsonl, fit.json, sweep.png")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides of the base config (model size keys are the sweep's)")
    a = p.parse_args(argv)
    if a.time_budget is not None and not (math.isfinite(a.time_budget) and a.time_budget > 0):
        p.error(f"argument --time-budget: must be positive, got {a.time_budget}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def body() -> int:
        plot.pyplot()  # a missing matplotlib fails now, not after the training
        base = load_config(a.config, a.overrides)
        out = Path(a.out)
        record = provenance(argv, prog="python -m gptjax.sweep")
        points = run_sweep(base, a.sizes, a.budgets, out, a.time_budget, record)
        report(points, out)
        return 0

    return run_cli("python -m gptjax.sweep", body)


if __name__ == "__main__":
    sys.exit(main())
