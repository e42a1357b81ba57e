"""What a training run reports: one writer for every line it prints (which keeps a terminal's
progress bar intact), metrics.jsonl and TensorBoard events, and the per-log-interval figures
(loss, learning rate, gradient norm, tokens/s, MFU, ETA, skipped steps)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
from etils import epath
from tqdm import tqdm

from gptjax.errors import UserError, refused


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever
    it is installed (the hf extra installs it), only to accept torch tensors; we log floats, and
    torch cost every training process 1.4 s of its start and ~300 MB."""
    with refused("torch"):
        from tensorboardX import SummaryWriter
    return SummaryWriter


class Console:
    """Prints the run's lines on process 0 (none when quiet). On a terminal a progress bar sits
    below them: lines go out through tqdm, which clears the bar, prints, and redraws it."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and jax.process_index() == 0
        self.bar: tqdm | None = None
        # The streams as they are now: checkpoint code swaps sys.stderr for a moment to keep
        # orbax quiet, and a line from the signal watcher may come during that moment.
        self.out, self.err = sys.stdout, sys.stderr

    def open_bar(self, total_steps: int, start_step: int) -> None:
        """The progress bar, on a terminal only (on stderr, as tqdm draws it)."""
        if self.enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, leave=False)

    def say(self, line: str) -> None:
        """One line on stdout, printed above the bar where there is one."""
        if self.enabled:
            self._print(line, self.out)

    def warn(self, message: str) -> None:
        """A warning on stderr, from every process and even when quiet."""
        self._print(f"warning: {message}", self.err)

    def _print(self, line: str, file: Any) -> None:
        if self.bar is not None:
            self.bar.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show_loss(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog:
    """metrics.jsonl (+ TensorBoard events) in the run directory, written by process 0 only.

    The file goes through etils.epath (as orbax and TFDS do), so a run directory may be a URL
    such as gs://; object stores cannot append, so there each write replaces the whole file."""

    def __init__(self, run_dir: str | os.PathLike[str], resume_step: int) -> None:
        self.enabled = jax.process_index() == 0
        # str(): a pathlib.Path would already have folded gs://b to gs:/b.
        self.remote = "://" in str(run_dir)
        run_dir = epath.Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.lines: list[str] = []  # what the file holds; rewritten whole where it cannot append
        self.tb = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run recomputes the steps after its checkpoint: drop their old lines.
        if self.path.exists():
            kept = []
            for ln in self.path.read_text().splitlines():
                try:
                    if json.loads(ln).get("step", 0) <= resume_step:
                        kept.append(ln + "\n")
                except (json.JSONDecodeError, AttributeError):
                    pass  # a line cut short by a kill
            self.path.write_text("".join(kept))
            self.lines = kept
        self.tb = _summary_writer()(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Collects each step's metrics on the device and syncs them only at `flush`: one host
    transfer per log interval, not per step."""

    def __init__(self, console: Console, log: MetricsLog, *, total_steps: int, tokens: int,
                 flops_per_token: float, hardware_flops_per_token: float,
                 peak_flops: float | None, max_bad_steps: int) -> None:
        self.console, self.log = console, log
        self.total_steps, self.max_bad_steps = total_steps, max_bad_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.hardware_flops_per_token = hardware_flops_per_token
        self.pending: list[tuple[int, float, int, int, dict[str, jax.Array]]] = []
        self.skipped = 0
        self.last_loss: float | None = None
        self.clock, self.tokens_at_clock = time.perf_counter(), tokens

    def record(self, step: int, lr: float, tokens: int, n_micro: int,
               metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, lr, tokens, n_micro, metrics))
        self.console.advance()

    def restart_clock(self) -> None:
        """After an evaluation: tokens/s measures training alone."""
        self.clock = time.perf_counter()

    def flush(self, step: int, tokens: int) -> None:
        """Logs the steps recorded since the last flush and prints the line of `step`; stops
        the run (UserError) after train.max_bad_steps non-finite steps in a row."""
        if not self.pending:
            return
        got = jax.device_get([p[-1] for p in self.pending])
        now = time.perf_counter()
        tps = (tokens - self.tokens_at_clock) / max(now - self.clock, 1e-9)
        mfu = hfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tps / (self.peak_flops * jax.device_count())
            hfu = mfu * self.hardware_flops_per_token / self.flops_per_token
        eta = (self.total_steps - step) * (now - self.clock) / len(self.pending)
        for (s, lr, tok, n_micro, _), m in zip(self.pending, got):
            rec = {"step": s, "loss": float(m["loss"]), "lr": lr,
                   "grad_norm": float(m["grad_norm"]), "tokens": tok, "microbatches": n_micro,
                   "skipped": bool(m["skipped"])}
            self.skipped += int(rec["skipped"])
            if s == step:
                rec.update(tokens_per_s=tps, mfu=mfu, hfu=hfu)
            self.log.write(rec)
        last, lr = got[-1], self.pending[-1][1]
        self.last_loss = float(last["loss"])
        line = (f"step {step}/{self.total_steps} | loss {self.last_loss:.4f} | lr {lr:.3e} | "
                f"grad norm {float(last['grad_norm']):.3f} | {tps:,.0f} tok/s | "
                f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
                + (f" (HFU {100 * hfu:.1f}%)" if hfu is not None and hfu != mfu else "")
                + f" | ETA {eta / 60:.1f} min")
        if self.skipped:
            line += f" | skipped {self.skipped}"
        self.console.show_loss(self.last_loss)
        self.console.say(line)
        self.pending.clear()
        self.clock, self.tokens_at_clock = now, tokens
        streak = max(int(m["bad_streak"]) for m in got)  # any step of the interval
        if streak >= self.max_bad_steps:
            raise UserError(f"{streak} training steps in a row had a non-finite loss or gradient "
                            f"(train.max_bad_steps={self.max_bad_steps}); stopping. Lower "
                            f"optim.learning_rate or check the data")
