"""The training loop: set up a run, restore or initialize its state, build the step, then train
with logging, evaluation, checkpoints and preemption. `train` reads top to bottom; the pure
step functions live in state.py, the costs (remat auto, peak FLOPs) in plan.py."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gptjax import checkpoint, sharding
from gptjax.eval import fewshot
from gptjax.lora import adapters as lora_lib
from gptjax.lora import runs as lora_runs
from gptjax.train import optim
from gptjax import data as data_lib
from gptjax.train.plan import choose_remat, device_peak_flops, remat_needs_text
from gptjax.config import Config, ModelConfig, config_to_dict
from gptjax.errors import UserError
from gptjax.model import count_params, flops_per_token, hardware_flops_per_token
from gptjax.train.progress import Console, MetricsLog, Progress
from gptjax.train.state import (
    TrainState,
    abstract_params,
    abstract_state,
    batch_abstract,
    compile_train_step,
    init_state,
    jit_eval_step,
    jit_train_step,
    state_at,
)

@dataclasses.dataclass
class Run:
    """What every piece of a run needs: config, mesh, schedule, optimizer, abstract state."""

    cfg: Config
    mesh: Mesh
    run_dir: Path | epath.Path
    schedule: optim.BatchSchedule
    tx: optax.GradientTransformation
    n_steps: int
    abs_state: TrainState
    state_sh: TrainState
    lora: lora_lib.LoraSpec | None = None  # LoRA: state.params are adapters over `base`
    base_abs: Any = None  # the frozen base's ShapeDtypeStructs with shardings
    base: Any = None  # the frozen base, once restore_or_init has loaded it
    base_ref: dict[str, Any] | None = None  # its path, step and checksum, for the meta
    console: Console | None = None

    @classmethod
    def create(cls, cfg: Config, mesh: Mesh | None) -> Run:
        """Checks the batch against the mesh and plans the state's shapes and shardings, before
        anything touches the run directory."""
        mesh = mesh or sharding.make_mesh(cfg.mesh)
        schedule = optim.BatchSchedule(cfg.optim, cfg.train, cfg.model.context_length)
        sharding.check_batch(schedule.micro_size, mesh, "train.batch_size / train.microbatches")
        n_data = sharding.data_parallel_size(mesh)
        if n_data % jax.process_count():
            raise UserError(f"the data axes (mesh data x fsdp = {n_data}) must span all "
                            f"{jax.process_count()} processes: each process feeds its own rows")
        tx = optim.make_optimizer(cfg.optim)
        spec = lora_lib.LoraSpec.of(cfg.train)
        with sharding.activate(mesh):
            abs_state, state_sh = abstract_state(cfg, mesh, tx)
            base_abs = abstract_params(cfg, mesh)[0] if spec else None
        return cls(cfg, mesh, checkpoint.run_path(cfg.train.run_dir), schedule, tx,
                   schedule.total_steps(), abs_state, state_sh, spec, base_abs)

    def params_for_eval(self, params: Any) -> Any:
        """What evaluation scores: the parameters, or the base carrying the adapters."""
        return params if self.lora is None else lora_lib.attach(self.base, params, self.lora)

    def say(self, line: str) -> None:
        if self.console is not None:
            self.console.say(line)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where training starts: the step, tokens seen, and the data iterator's state."""

    step: int = 0
    tokens: int = 0
    data_state: dict | None = None


def restore_or_init(run: Run, ckpt: checkpoint.Checkpointer) -> tuple[TrainState, Start]:
    """The run directory's latest checkpoint that restores, else train.init_from's parameters
    with a fresh optimizer, else fresh parameters. Under LoRA, loads the frozen base first (and
    on resume checks it is the one the adapters were trained on). Called inside
    sharding.activate(run.mesh)."""
    cfg, mesh = run.cfg, run.mesh
    restored, meta = None, None
    if ckpt.all_steps():
        _, meta = checkpoint.read_meta(run.run_dir)
        diff, what = _model_diff(meta["config"]["model"], config_to_dict(cfg)["model"]), "model"
        if not diff:
            diff, what = _lora_diff(meta["config"]["train"], config_to_dict(cfg)["train"]), "LoRA"
        if diff:
            raise UserError(f"run directory {run.run_dir} was written by a different {what} "
                            f"config ({diff}); use another train.run_dir")
    if run.lora is not None:
        load_base(run, meta)
    if meta is not None:
        restored = ckpt.restore(run.abs_state.params, run.abs_state.opt_state)
    if restored is not None:
        step, params, opt_state, data_state, meta = restored
        run.say(f"resumed from {run.run_dir} at step {step}")
        return (state_at(step, params, opt_state, run.state_sh),
                Start(step, int(meta["tokens"]), data_state))
    params = None
    if cfg.train.init_from and run.lora is None:
        params, _ = lora_runs.load_weights(cfg.train.init_from, cfg, run.abs_state.params)
        run.say(f"fine-tuning: parameters from {cfg.train.init_from}, fresh optimizer, step 0")
    return init_state(cfg, mesh, run.tx, run.state_sh, params=params), Start()


def load_base(run: Run, meta: dict[str, Any] | None) -> None:
    """LoRA's frozen base from train.init_from: on resume, the step recorded in the run, and
    refused unless its checksum equals the recorded one."""
    ref = None if meta is None else meta.get(lora_runs.BASE_KEY)
    source = run.cfg.train.init_from
    run.base, step = lora_runs.load_weights(source, run.cfg, run.base_abs,
                                            None if ref is None else ref["step"])
    if ref is not None:
        lora_runs.check_base(ref, run.base, f"train.init_from={source}")
    run.base_ref = ref or lora_runs.base_reference(source, step, run.base)
    at = "" if step is None else f" (step {step})"
    run.say(f"LoRA {run.lora.describe()} over {source}{at}")


def _model_diff(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    for k in sorted(set(saved) | set(current)):
        if k not in ModelConfig.EXECUTION_FIELDS and saved.get(k) != current.get(k):
            return f"model.{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now"
    return None


def _lora_diff(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """A change of what the adapters are: full fine-tuning vs LoRA, rank, targets or alpha."""
    was, now = saved.get("lora_rank", 0), current["lora_rank"]
    keys = ("lora_rank", "lora_targets", "lora_alpha") if was and now else ("lora_rank",)
    for k in keys:
        a, b = saved.get(k, 0), current[k]
        if k == "lora_targets":
            a, b = tuple(a), tuple(b)
        if a != b:
            return f"train.{k}: {a!r} in the run, {b!r} now"
    return None


def build_step(run: Run, tokens: int) -> tuple[ModelConfig, Any]:
    """(model config with remat resolved, step function (state, batch, lr) -> (state, metrics)).

    model.remat=auto compiles every batch shape the run uses for each policy in turn; the loop
    then runs those compiled programs (a jit would compile them again) and jits the ramp's
    other shapes. Called, and the step function called, inside sharding.activate(run.mesh)."""
    m_cfg, mesh, schedule = run.cfg.model, run.mesh, run.schedule
    compiled_for: dict[int, Any] = {}  # microbatches per step -> the step compiled ahead
    if m_cfg.remat == "auto":
        # One microbatch (no accumulation loop) and the most the batch ramp reaches (the loop
        # and its fp32 gradient accumulator).
        n_micros = schedule.extreme_sizes(tokens)
        shapes = [batch_abstract(mesh, n, schedule.micro_size, m_cfg.context_length)
                  for n in n_micros]
        m_cfg, compiled, tried = choose_remat(m_cfg, lambda m: [
            compile_train_step(m, run.tx, mesh, run.state_sh, run.abs_state, b, run.lora,
                               run.base_abs) for b in shapes])
        compiled_for = dict(zip(n_micros, compiled))
        run.say(f"model.remat=auto: {m_cfg.remat} ({remat_needs_text(tried)})")
    base_sh = None if run.lora is None else jax.tree.map(lambda a: a.sharding, run.base_abs)
    jitted = jit_train_step(m_cfg, run.tx, mesh, run.state_sh, run.lora, base_sh)

    def step_fn(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array) -> Any:
        return compiled_for.get(batch["inputs"].shape[0], jitted)(state, batch, lr, run.base)

    return m_cfg, step_fn


class Evaluator:
    """Validation loss and perplexity over the validation split (train.eval_batches of it),
    printed and logged; a source without one disables evaluation with a warning."""

    def __init__(self, run: Run, m_cfg: ModelConfig, log: MetricsLog, progress: Progress) -> None:
        self.run, self.log, self.progress = run, log, progress
        p_sh = run.state_sh.params
        if run.lora is not None:
            p_sh = {**jax.tree.map(lambda a: a.sharding, run.base_abs), "lora": p_sh}
        self.eval_fn = jit_eval_step(m_cfg, run.mesh, p_sh)
        self.enabled = True
        self.losses: list[tuple[int, float]] = []

    def loss(self, params: Any) -> float:
        run, limit = self.run, self.run.cfg.train.eval_batches
        sums = []
        for i, b in enumerate(data_lib.eval_batches(run.cfg, run.schedule.micro_size)):
            if limit and i >= limit:
                break
            sums.append(self.eval_fn(params, sharding.to_global(b, run.mesh)))
        sums = jax.device_get(sums)
        return sum(float(s) for s, _ in sums) / max(sum(float(c) for _, c in sums), 1.0)

    def __call__(self, params: Any, step: int) -> None:
        if not self.enabled:
            return
        params = self.run.params_for_eval(params)
        try:
            loss = self.loss(params)
        except data_lib.CorruptCacheError:
            raise  # corrupt data stops the run; only a missing split disables evaluation
        except data_lib.DataError as e:  # no validation split (one small file, val_fraction=0)
            self.run.console.warn(f"evaluation disabled: {e}")
            self.enabled = False
            return
        finally:
            self.progress.restart_clock()  # tokens/s measures training, not evaluation
        ppl = math.exp(min(loss, 50.0))
        self.losses.append((step, loss))
        self.log.write({"step": step, "val_loss": loss, "val_ppl": ppl})
        self.run.say(f"step {step} | validation loss {loss:.4f} | perplexity {ppl:.2f}")
        # Few-shot scoring compiles its own programs, with no mesh, even inside the loop's.
        with jax.set_mesh(None):
            fewshot.during_training(params, self.run.cfg, step, self.log.write, self.run.say)
        self.progress.restart_clock()  # nor does few-shot scoring count as training time


class BatchFeed:
    """Global batches for each step, drawn one step ahead so the copy to the devices overlaps
    the step in flight; each comes with the data iterator's state after it."""

    def __init__(self, run: Run, start: Start) -> None:
        self.run = run
        self.it = data_lib.TrainIterator(run.cfg, run.schedule.micro_size, state=start.data_state)

    def next_global_batch(self, tokens: int) -> tuple[int, dict[str, jax.Array], dict]:
        n_micro = self.run.schedule.num_microbatches(tokens)
        micro = [next(self.it) for _ in range(n_micro)]
        local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        batch = sharding.to_global(local, self.run.mesh, stacked=True)
        return n_micro, batch, self.it.get_state()

    def close(self) -> None:
        self.it.close()


class Preemption:
    """SIGTERM or SIGINT: the run finishes its step, saves and ends with exit code 0; a second
    SIGINT ends the process at once (130), leaving the checkpoints already committed as they
    are. A watcher thread says so the moment a signal arrives: Python runs its own handlers only
    between bytecodes, which can be seconds away while the main thread waits on the devices."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested = False
        self._old: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1

    def __enter__(self) -> Preemption:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, lambda signum, frame: None)
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._old_wakeup = signal.set_wakeup_fd(w)  # written by the C-level handler at once
        except ValueError:  # not the main thread: no signal handling
            self.__exit__()
            return self
        self._pipe = (r, w)
        threading.Thread(target=self._watch, args=(r,), daemon=True).start()
        return self

    def _watch(self, r: int) -> None:
        while data := os.read(r, 1):
            sig = signal.Signals(data[0])
            if sig not in (signal.SIGTERM, signal.SIGINT):
                continue  # the wakeup fd hears every signal with a Python handler
            if self.requested and sig == signal.SIGINT:
                self.console.warn("second interrupt: exiting now; committed checkpoints are kept")
                os._exit(130)
            if not self.requested:
                self.console.warn(f"{sig.name}: stopping after this step with a checkpoint "
                                  f"(interrupt again to exit at once)")
            self.requested = True
        os.close(r)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._pipe[1])  # the watcher reads EOF and ends
            self._pipe = None

    def should_stop(self, step: int, exchange: bool) -> bool:
        """exchange: also share local signals with the other hosts (a collective, so only at
        log steps, not every step)."""
        if jax.process_count() == 1:
            return self.requested
        # Every host must stop at the same step. JAX's preemption service (cloud preemption
        # notices) agrees on one; signals sent to single hosts are shared.
        try:
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        except RuntimeError:  # no preemption service in this cluster
            pass
        if not exchange:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def lock_run_dir(run_dir: Path | epath.Path) -> checkpoint.RunLock:
    """Process 0 takes the run directory's lock; every process learns whether it did."""
    lock, error = checkpoint.RunLock(run_dir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        locked = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and error is None:
            raise UserError(f"process 0 could not lock train.run_dir={run_dir}")
    if error is not None:
        raise error
    return lock


def train(cfg: Config, *, mesh: Mesh | None = None, quiet: bool = False) -> dict[str, Any]:
    """Trains (or resumes) `cfg` into cfg.train.run_dir. Returns a summary dict."""
    t_start, t_cfg = time.perf_counter(), cfg.train
    run = Run.create(cfg, mesh)
    run.console = Console(quiet)
    with contextlib.ExitStack() as cleanup:  # each part closes, even when another fails
        cleanup.callback(run.console.close)
        # Signals are watched until the very end: a second Ctrl-C during the last save exits too.
        preempt = cleanup.enter_context(Preemption(run.console))
        cleanup.callback(lock_run_dir(run.run_dir).release)
        ckpt = checkpoint.Checkpointer(run.run_dir, keep=t_cfg.keep_checkpoints)
        cleanup.callback(ckpt.close)
        # Whatever traces the model resolves its logical axes on the mesh: setup, then the loop.
        with sharding.activate(run.mesh):
            state, start = restore_or_init(run, ckpt)
            run.say(describe_run(cfg.model, run.mesh))
            if run.lora is not None:
                run.say(describe_trainable(run, state.params))
            m_cfg, step_fn = build_step(run, start.tokens)
        log = MetricsLog(run.run_dir, start.step)
        cleanup.callback(log.close)
        run.console.open_bar(run.n_steps, start.step)
        progress = Progress(run.console, log, total_steps=run.n_steps, tokens=start.tokens,
                            flops_per_token=flops_per_token(m_cfg),
                            hardware_flops_per_token=hardware_flops_per_token(m_cfg),
                            peak_flops=device_peak_flops(t_cfg.peak_tflops),
                            max_bad_steps=t_cfg.max_bad_steps)
        evaluate = Evaluator(run, m_cfg, log, progress)
        feed = cleanup.enter_context(contextlib.closing(BatchFeed(run, start)))
        cleanup.enter_context(sharding.activate(run.mesh))  # the loop: new ramp shapes trace
        step, tokens, preempted = start.step, start.tokens, False
        if step == 0:
            evaluate(state.params, 0)  # the baseline the run's progress is judged against
        ahead = feed.next_global_batch(tokens) if step < run.n_steps else None
        while step < run.n_steps:
            n_micro, batch, data_state = ahead
            step_tokens = run.schedule.tokens_per_step(tokens)
            lr = optim.learning_rate(cfg.optim, tokens + step_tokens)
            state, metrics = step_fn(state, batch, jnp.float32(lr))
            step, tokens = step + 1, tokens + step_tokens
            if step < run.n_steps:  # read and send the next batch while this step runs
                ahead = feed.next_global_batch(tokens)
            progress.record(step, lr, tokens, n_micro, metrics)
            # The one place that decides whether this step waits for the devices.
            last = step == run.n_steps
            log_due = step % t_cfg.log_every == 0 or last
            eval_due = step % t_cfg.eval_every == 0 or last
            save_due = step % t_cfg.checkpoint_every == 0 or last
            preempted = preempt.should_stop(step, exchange=step % t_cfg.log_every == 0)
            if log_due or eval_due or save_due or preempted:
                progress.flush(step, tokens)
            if eval_due:
                evaluate(state.params, step)
            if save_due or preempted:
                save(ckpt, run, state, step, tokens, data_state)
            if preempted:
                run.say(f"stopping at step {step} on request; checkpoint saved")
                break
    summary = {"start_step": start.step, "step": step, "tokens": tokens,
               "seconds": time.perf_counter() - t_start, "skipped": progress.skipped,
               "loss": progress.last_loss}
    if evaluate.losses:
        summary["val_losses"] = evaluate.losses
    if preempted:
        summary["preempted"] = True
    return summary


def describe_run(m_cfg: ModelConfig, mesh: Mesh) -> str:
    return (f"model: {count_params(m_cfg) / 1e6:.2f}M parameters, {m_cfg.n_layer} layers, "
            f"d_model {m_cfg.d_model}, pattern {'/'.join(m_cfg.attention_pattern)}; mesh "
            f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")


def describe_trainable(run: Run, adapters: Any) -> str:
    n, total = lora_lib.count(adapters), count_params(run.cfg.model)
    return (f"trainable: {n:,} adapter parameters ({100 * n / total:.3g}% of the base's "
            f"{total:,}, frozen in {run.cfg.model.param_dtype})")


def save(ckpt: checkpoint.Checkpointer, run: Run, state: TrainState, step: int, tokens: int,
         data_state: dict) -> None:
    cfg = run.cfg
    if not checkpoint.all_finite(state.params):
        raise UserError(f"parameters are not finite at step {step}; not saving")
    extra = {"tokens": tokens}
    if run.base_ref is not None:
        extra[lora_runs.BASE_KEY] = run.base_ref
    meta = checkpoint.make_meta(cfg, step, extra)
    ckpt.save(step, state.params, state.opt_state, data_state, meta)
