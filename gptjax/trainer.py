"""Training: TrainState, the pure train/eval steps, and the loop (logging, eval, checkpoints,
preemption, non-finite guard). One code path for one CPU, one GPU, a TPU slice or many hosts:
everything is a global jax.Array on a mesh and the step is jitted once per batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import checkpoint, optim, sharding
from gptjax.config import Config, ModelConfig, UserError, config_to_dict
from gptjax.model import (
    GPT,
    chunked_cross_entropy,
    compute_params,
    count_params,
    cross_entropy,
    flops_per_token,
    init_params,
    stack_layers,
    unstack_layers,
)

# Dense bf16 matmul peak per chip, FLOP/s, by jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("A10", 125e12), ("V100", 125e12), ("TPU v6", 918e12), ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # steps taken, skipped ones included (each consumed its batch)
    params: Any
    opt_state: Any
    bad_streak: jax.Array  # consecutive non-finite steps


def _sum_loss(params: Any, model_cfg: ModelConfig, mb: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, tokens counted) of one microbatch."""
    params = compute_params(params, model_cfg, embeddings=False)
    chunk = model_cfg.loss_chunk
    if chunk and chunk < mb["inputs"].shape[-1]:
        x = GPT(model_cfg).apply({"params": params}, mb["inputs"], return_hidden=True)
        return chunked_cross_entropy(x, params["wte"], mb["targets"], mb.get("mask"), model_cfg,
                                     chunk)
    logits = GPT(model_cfg).apply({"params": params}, mb["inputs"])
    mean, count = cross_entropy(logits, mb["targets"], mb.get("mask"))
    return mean * count, count


def train_step(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array, *,
               model_cfg: ModelConfig, tx: optax.GradientTransformation
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over batch [n_micro, B, T], gradients accumulated over the microbatches.

    A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged.
    """
    grad_fn = jax.value_and_grad(_sum_loss, has_aux=True)

    def micro(carry: Any, mb: dict[str, jax.Array]) -> tuple[Any, None]:
        g_acc, nll_acc, n_acc = carry
        (nll, n), g = grad_fn(state.params, model_cfg, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, nll_acc + nll, n_acc + n), None

    if jax.tree.leaves(batch)[0].shape[0] == 1:
        # One microbatch: no accumulator to zero and add into, no loop around the step.
        (nll, count), grads = grad_fn(state.params, model_cfg, jax.tree.map(lambda a: a[0], batch))
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, nll, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
    count = jnp.maximum(count, 1.0)
    # Sum of per-token gradients / tokens: k microbatches equal one batch k times as large.
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = nll / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok,
               "bad_streak": new_state.bad_streak}
    return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model_cfg: ModelConfig
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, tokens) over one [B, T] batch; rows with mask 0 are padding."""
    return _sum_loss(params, model_cfg, batch)


# --------------------------------------------------------------------------- state and shardings


def batch_shardings(mesh: Mesh, stacked: bool) -> NamedSharding:
    spec = P(None, sharding.BATCH_AXES, None) if stacked else P(sharding.BATCH_AXES, None)
    return NamedSharding(mesh, spec)


def batch_abstract(mesh: Mesh, n_micro: int, micro: int, T: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and shardings of a train batch of n_micro microbatches (for compiling ahead)."""
    return {k: jax.ShapeDtypeStruct((n_micro, micro, T), dt, sharding=batch_shardings(mesh, True))
            for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32), ("mask", jnp.float32))}


def jit_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   state_sh: TrainState) -> Any:
    """train_step jitted as the loop runs it: (state, stacked batch, lr) -> (state, metrics),
    the state donated and kept in its shardings."""
    return jax.jit(
        functools.partial(train_step, model_cfg=model_cfg, tx=tx),
        in_shardings=(state_sh, batch_shardings(mesh, True), None),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def compile_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                       state_sh: TrainState, state: Any, batch: Any) -> Any:
    """jit_train_step compiled ahead of time for these (abstract or concrete) arguments. Call it
    inside sharding.activate(mesh)."""
    return jit_train_step(model_cfg, tx, mesh, state_sh).lower(
        state, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()


def memory_need_gib(compiled: Any) -> float | None:
    """What a compiled program needs on each device by XLA's memory analysis (arguments,
    outputs and temporaries, less donated buffers), GiB; None where the backend gives none."""
    try:
        ma = compiled.memory_analysis()
        need = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                - ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - some backends give no analysis
        return None
    return need / 2**30


REMAT_ORDER = ("none", "dots", "full")  # least recomputation first


def device_memory_limit_gib() -> float | None:
    """What JAX may allocate on each device (XLA_PYTHON_CLIENT_MEM_FRACTION of a GPU's memory,
    75% by JAX's default), the least over all processes; None where no device reports one
    (the CPU)."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    limit = float((stats or {}).get("bytes_limit") or -1)
    if jax.process_count() > 1:  # every process must compile the same program
        from jax.experimental import multihost_utils

        limits = np.asarray(multihost_utils.process_allgather(np.float64(limit)))
        known = limits[limits > 0]
        limit = float(known.min()) if known.size else -1.0
    return limit / 2**30 if limit > 0 else None


def choose_remat(model_cfg: ModelConfig, compile_fn: Any, limit_gib: float | None = -1,
                 margin: float = 0.9) -> tuple[ModelConfig, list[Any], dict[str, float | None]]:
    """model.remat=auto: compiles the step with remat none, dots, full in that order and keeps
    the first whose memory need, by XLA's analysis, fits in margin × limit_gib (-1:
    device_memory_limit_gib(); None: the first fits). compile_fn(model_cfg) returns the compiled
    programs the run will use (one per batch shape); the largest need counts. The margin covers
    what the analysis leaves out: fragmentation, cuBLAS/cuDNN workspaces. A compile that runs
    out of memory (TPU compilers refuse a program that cannot fit) counts as not fitting.
    Returns (config with the policy, its compiled programs, GiB needed per policy tried)."""
    if limit_gib == -1:
        limit_gib = device_memory_limit_gib()
    tried: dict[str, float | None] = {}
    for policy in REMAT_ORDER:
        m = dataclasses.replace(model_cfg, remat=policy)
        try:
            compiled = compile_fn(m)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            tried[policy] = None
            continue
        needs = [memory_need_gib(c) for c in compiled]
        need = tried[policy] = None if None in needs else max(needs)
        if limit_gib is None or need is None or need <= margin * limit_gib:
            return m, compiled, tried
    limit = "" if limit_gib is None else f"{limit_gib:.1f} "
    raise UserError(f"model.remat=auto: no remat policy fits {margin:.0%} of the {limit}GiB JAX "
                    f"may allocate per device ({remat_needs_text(tried)}; n/a: the compile ran "
                    f"out of memory); use more train.microbatches, more devices, or mesh.fsdp")


def remat_needs_text(tried: dict[str, float | None]) -> str:
    """choose_remat's GiB per policy tried, for a log line."""
    return "XLA's memory need per device: " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.2f} GiB'}" for k, v in tried.items())


def abstract_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation
                   ) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, state shardings), allocating nothing."""
    p_sh = sharding.param_shardings(cfg.model, mesh)
    p_abs = jax.eval_shape(lambda k: init_params(cfg.model, k), jax.random.key(0))
    p_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), p_abs, p_sh)
    rep = sharding.replicated(mesh)
    o_abs = jax.eval_shape(tx.init, p_abs)
    o_sh = opt_state_shardings(o_abs, p_abs, rep)
    o_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), o_abs, o_sh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    abs_state = TrainState(step=scalar, params=p_abs, opt_state=o_abs, bad_streak=scalar)
    shardings = TrainState(step=rep, params=p_sh, opt_state=o_sh, bad_streak=rep)
    return abs_state, shardings


def opt_state_shardings(opt_abs: Any, params_abs: Any, default: NamedSharding) -> Any:
    """Adam's moments mirror the parameter tree: each leaf whose path ends with a parameter's
    path (and has its shape) takes that parameter's sharding; counters are replicated.
    (XLA does not propagate shardings into zeros_like, so this must be explicit.)"""
    by_path = {
        tuple(str(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params_abs)
    }

    def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            p = by_path.get(keys[i:])
            if p is not None and p.shape == leaf.shape:
                return p.sharding
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_abs)


def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: TrainState,
               params: Any = None) -> TrainState:
    if params is None:
        params = sharding.init_sharded_params(cfg.model, mesh, jax.random.key(cfg.train.seed))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    # Two distinct buffers: the state is donated, and one buffer cannot be donated twice.
    step, streak = (jax.device_put(jnp.zeros((), jnp.int32), shardings.step) for _ in range(2))
    return TrainState(step=step, params=params, opt_state=opt_state, bad_streak=streak)


def to_global(local: dict[str, np.ndarray], mesh: Mesh, stacked: bool) -> dict[str, jax.Array]:
    """Process-local numpy rows → global arrays split over the data axes."""
    sh = batch_shardings(mesh, stacked)
    out = {}
    for k, v in local.items():
        shape = list(v.shape)
        axis = 1 if stacked else 0
        shape[axis] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(sh, v, tuple(shape))
    return out


def device_peak_flops(override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def all_finite(tree: Any) -> bool:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(jnp.stack(leaves).all()) if leaves else True


# --------------------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def should_stop(self, step: int, exchange: bool) -> bool:
        """exchange: also share local signals with the other hosts (a collective, so only at
        log steps, not every step)."""
        if jax.process_count() > 1:
            # Every host must stop at the same step. JAX's preemption service (cloud
            # preemption notices) agrees on one; signals sent to single hosts are shared.
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # no preemption service in this cluster
                pass
            if not exchange:
                return False
            flags = multihost_utils.process_allgather(np.array(self.requested))
            return bool(np.any(flags))
        return self.requested


def total_steps(cfg: Config, schedule: optim.BatchSchedule) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    steps, tokens = 0, 0
    while tokens < cfg.train.total_tokens:
        if tokens >= cfg.optim.ramp_tokens:
            full = schedule.full_tokens
            return steps + -(-(cfg.train.total_tokens - tokens) // full)
        tokens += schedule.tokens_per_step(tokens)
        steps += 1
    return steps


def load_init_params(source: str, cfg: Config, abstract_params: Any) -> Any:
    """Parameters (only) of another run or a Hugging Face GPT-2 directory, restored straight into
    this run's shardings."""
    from gptjax import hf

    if hf.is_hf_dir(source):
        return hf.init_params_for(source, cfg.model, abstract_params)
    _, meta = checkpoint.read_meta(source)
    their_model = checkpoint.config_from_dict(meta["config"]).model
    # The same weights in the other layout (scanned stacks vs unrolled layers_i) convert.
    relayout = their_model.scan_layers != cfg.model.scan_layers
    as_mine = dataclasses.replace(their_model, scan_layers=cfg.model.scan_layers)
    theirs = jax.eval_shape(lambda k: init_params(as_mine, k), jax.random.key(0))
    mine = jax.tree_util.tree_leaves_with_path(abstract_params)
    their_shapes = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(theirs)}
    for path, a in mine:
        key = jax.tree_util.keystr(path)
        if their_shapes.get(key) != a.shape:
            raise UserError(f"train.init_from={source}: parameter {key} has shape "
                            f"{their_shapes.get(key)} there but {a.shape} in this config")
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    if relayout:  # read onto one device in their layout, then restack and place
        params = checkpoint.load_params(source)[0]
        params = (unstack_layers(params, their_model) if their_model.scan_layers
                  else stack_layers(params, their_model))
        return jax.device_put(params, shardings)
    params, _, _, _ = checkpoint.load_params(source, shardings=shardings)
    return params


# Model fields that change how a step runs, not the parameters: a run resumes under new values.
_RUN_ONLY_FIELDS = ("remat", "attention_impl", "loss_chunk")


def _model_diff(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    for k in sorted(set(saved) | set(current)):
        if k not in _RUN_ONLY_FIELDS and saved.get(k) != current.get(k):
            return f"model.{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now"
    return None


class MetricsLog:
    """metrics.jsonl (+ TensorBoard events) in the run directory, written by process 0 only."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
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
                        kept.append(ln)
                except (json.JSONDecodeError, AttributeError):
                    pass  # a line cut short by a kill
            self.path.write_text("".join(k + "\n" for k in kept))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: Config, *, mesh: Mesh | None = None, quiet: bool = False) -> dict[str, Any]:
    """Trains (or resumes) `cfg` into cfg.train.run_dir. Returns a summary dict."""
    from gptjax import data as data_lib  # TensorFlow loads here, not at import

    t_cfg, m_cfg = cfg.train, cfg.model
    run_dir = Path(t_cfg.run_dir)
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    schedule = optim.BatchSchedule(cfg.optim, t_cfg, m_cfg.context_length)
    sharding.check_batch(schedule.micro_size, mesh, "train.batch_size / train.microbatches")
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    if n_data % jax.process_count():
        raise UserError(f"the data axes (mesh data x fsdp = {n_data}) must span all "
                        f"{jax.process_count()} processes: each process feeds its own rows")
    tx = optim.make_optimizer(cfg.optim)
    n_steps = total_steps(cfg, schedule)

    def say(msg: str) -> None:
        if not quiet and jax.process_index() == 0:
            print(msg, flush=True)

    with sharding.activate(mesh):
        abs_state, state_sh = abstract_state(cfg, mesh, tx)
    ckpt = checkpoint.Checkpointer(run_dir, keep=t_cfg.keep_checkpoints)
    restored = None
    if ckpt.all_steps():
        if ckpt.latest_step() is not None:
            _, meta = checkpoint.read_meta(run_dir)
            diff = _model_diff(meta["config"]["model"], config_to_dict(cfg)["model"])
            if diff:
                raise UserError(f"run directory {run_dir} was written by a different model config "
                                f"({diff}); use another train.run_dir")
        restored = ckpt.restore(abs_state.params, abs_state.opt_state)
    if restored is not None:
        step0, params, opt_state, data_state, meta = restored
        rep = state_sh.step
        state = TrainState(step=jax.device_put(jnp.int32(step0), rep), params=params,
                           opt_state=opt_state, bad_streak=jax.device_put(jnp.int32(0), rep))
        tokens = int(meta["tokens"])
        say(f"resumed from {run_dir} at step {step0}")
    else:
        params = None
        if t_cfg.init_from:
            params = load_init_params(t_cfg.init_from, cfg, abs_state.params)
            say(f"fine-tuning: parameters from {t_cfg.init_from}, fresh optimizer, step 0")
        with sharding.activate(mesh):
            state = init_state(cfg, mesh, tx, state_sh, params=params)
        step0, data_state, tokens = 0, None, 0

    n_params = count_params(m_cfg)
    fpt = flops_per_token(m_cfg)
    peak = device_peak_flops(t_cfg.peak_tflops)
    say(f"model: {n_params / 1e6:.2f}M parameters, {m_cfg.n_layer} layers, d_model "
        f"{m_cfg.d_model}, pattern {'/'.join(m_cfg.attention_pattern)}; mesh "
        f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")

    compiled_for: dict[int, Any] = {}  # microbatches per step -> the step compiled ahead
    if m_cfg.remat == "auto":
        # Every program the run will compile: one microbatch (no accumulation loop) and the
        # most the batch ramp reaches (the loop and its fp32 gradient accumulator).
        n_micros = sorted({schedule.num_microbatches(tokens), schedule.microbatches})
        shapes = [batch_abstract(mesh, n, schedule.micro_size, m_cfg.context_length)
                  for n in n_micros]
        with sharding.activate(mesh):
            m_cfg, compiled, tried = choose_remat(m_cfg, lambda m: [
                compile_train_step(m, tx, mesh, state_sh, abs_state, b) for b in shapes])
        compiled_for = dict(zip(n_micros, compiled))
        say(f"model.remat=auto: {m_cfg.remat} ({remat_needs_text(tried)})")

    jitted_step = jit_train_step(m_cfg, tx, mesh, state_sh)

    def step_fn(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array) -> Any:
        # The programs remat=auto compiled run their batch shapes (the jit would compile them
        # again: ~20 s for gpt3-xl); the jit compiles the ramp's other shapes.
        return compiled_for.get(batch["inputs"].shape[0], jitted_step)(state, batch, lr)

    eval_fn = jax.jit(
        functools.partial(eval_step, model_cfg=m_cfg),
        in_shardings=(state_sh.params, batch_shardings(mesh, False)),
    )

    def evaluate(params: Any) -> tuple[float, float]:
        total, count = 0.0, 0.0
        sums = []
        for i, b in enumerate(data_lib.eval_batches(cfg, schedule.micro_size)):
            if t_cfg.eval_batches and i >= t_cfg.eval_batches:
                break
            with sharding.activate(mesh):
                sums.append(eval_fn(params, to_global(b, mesh, stacked=False)))
        for s, c in jax.device_get(sums):
            total, count = total + float(s), count + float(c)
        loss = total / max(count, 1.0)
        return loss, math.exp(min(loss, 50.0))

    it = data_lib.TrainIterator(cfg, schedule.micro_size, state=data_state)
    log = MetricsLog(run_dir, step0)
    pending: list[tuple[int, float, int, int, dict[str, jax.Array]]] = []
    summary: dict[str, Any] = {"start_step": step0, "skipped": 0}
    bar = None
    if not quiet and jax.process_index() == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n_steps, initial=step0, unit="step", dynamic_ncols=True)
    t_last, tokens_last, t_start = time.perf_counter(), tokens, time.perf_counter()

    def flush(step: int) -> None:
        nonlocal t_last, tokens_last
        got = jax.device_get([p[-1] for p in pending])
        now = time.perf_counter()
        tps = (tokens - tokens_last) / max(now - t_last, 1e-9)
        mfu = fpt * tps / (peak * jax.device_count()) if peak else None
        eta = (n_steps - step) * (now - t_last) / max(len(pending), 1)
        for (s, lr, tok, n_micro, _), m in zip(pending, got):
            rec = {"step": s, "loss": float(m["loss"]), "lr": lr, "grad_norm": float(m["grad_norm"]),
                   "tokens": tok, "microbatches": n_micro, "skipped": bool(m["skipped"])}
            summary["skipped"] += int(rec["skipped"])
            if s == step:
                rec.update(tokens_per_s=tps, mfu=mfu)
            log.write(rec)
        last = got[-1]
        summary["loss"] = float(last["loss"])
        msg = (f"step {step}/{n_steps} | loss {float(last['loss']):.4f} | lr {pending[-1][1]:.3e} | "
               f"grad norm {float(last['grad_norm']):.3f} | {tps:,.0f} tok/s | "
               f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | ETA {eta / 60:.1f} min")
        if summary["skipped"]:
            msg += f" | skipped {summary['skipped']}"
        if bar is not None:
            bar.set_postfix_str(f"loss {float(last['loss']):.4f}")
            bar.write(msg)
        else:
            say(msg)
        streak = int(last["bad_streak"])
        pending.clear()
        t_last, tokens_last = now, tokens
        if streak >= t_cfg.max_bad_steps:
            raise UserError(f"{streak} training steps in a row had a non-finite loss or gradient "
                            f"(train.max_bad_steps={t_cfg.max_bad_steps}); stopping. Lower "
                            f"optim.learning_rate or check the data")

    def save(step: int, data_state: dict) -> None:
        if not all_finite(state.params):
            raise UserError(f"parameters are not finite at step {step}; not saving")
        meta = checkpoint.make_meta(cfg, step, {"tokens": tokens})
        ckpt.save(step, state.params, state.opt_state, data_state, meta)

    def draw(tokens: int) -> tuple[int, dict[str, jax.Array], dict]:
        """The next step's batch, already on its way to the devices (the copy overlaps the
        step in flight), and where the data iterator stands after it."""
        n_micro = schedule.num_microbatches(tokens)
        micro = [next(it) for _ in range(n_micro)]
        local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        with sharding.activate(mesh):
            batch = to_global(local, mesh, stacked=True)
        return n_micro, batch, it.get_state()

    eval_enabled = True

    def run_eval(step: int) -> None:
        nonlocal eval_enabled, t_last
        if not eval_enabled:
            return
        try:
            val_loss, val_ppl = evaluate(state.params)
        except data_lib.DataError as e:
            # No validation split (one small file, val_fraction=0): train anyway.
            checkpoint.warn(f"evaluation disabled: {e}")
            eval_enabled = False
            return
        finally:
            t_last = time.perf_counter()  # tokens/s measures training, not evaluation
        summary.setdefault("val_losses", []).append((step, val_loss))
        log.write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
        say(f"step {step} | validation loss {val_loss:.4f} | perplexity {val_ppl:.2f}")

    step = step0
    preempt = _Preemption()
    try:
        with preempt:
            if step0 == 0:
                run_eval(0)  # the baseline the run's progress is judged against
            ahead = draw(tokens) if step < n_steps else None
            while step < n_steps:
                n_micro, batch, data_state = ahead
                step_tokens = n_micro * schedule.micro_size * m_cfg.context_length
                lr = optim.learning_rate(cfg.optim, tokens + step_tokens)
                with sharding.activate(mesh):
                    state, metrics = step_fn(state, batch, jnp.float32(lr))
                step += 1
                tokens += step_tokens
                # Device prefetch: the next batch is read and sent while this step runs, so the
                # syncs below (logging, evaluation, checkpoints) leave the devices no gap to wait
                # on the input. Checkpoints record data_state, so a resume redraws it.
                if step < n_steps:
                    ahead = draw(tokens)
                pending.append((step, lr, tokens, n_micro, metrics))
                if bar is not None:
                    bar.update(1)
                if step % t_cfg.log_every == 0 or step == n_steps:
                    flush(step)
                if step % t_cfg.eval_every == 0 or step == n_steps:
                    if pending:
                        flush(step)
                    run_eval(step)
                if step % t_cfg.checkpoint_every == 0 or step == n_steps:
                    if pending:
                        flush(step)
                    save(step, data_state)
                if preempt.should_stop(step, exchange=step % t_cfg.log_every == 0):
                    if pending:
                        flush(step)
                    save(step, data_state)
                    say(f"stopping at step {step} on request; checkpoint saved")
                    summary["preempted"] = True
                    break
    finally:
        ckpt.close()
        it.close()
        log.close()
        if bar is not None:
            bar.close()
    summary.update(step=step, tokens=tokens, seconds=time.perf_counter() - t_start)
    return summary


# --------------------------------------------------------------------------- dry run


def dry_run(cfg: Config, mesh: Mesh, *, compile_step: bool | None = None,
            mfu: float = 0.5, peak_tflops: float | None = None) -> str:
    """Per-device memory and FLOPs of a config on a mesh, with no weights allocated."""
    tx = optim.make_optimizer(cfg.optim)
    with sharding.activate(mesh):
        abs_state, state_sh = abstract_state(cfg, mesh, tx)

    def per_device(tree: Any) -> int:
        total = 0
        for a in jax.tree.leaves(tree):
            shard = a.sharding.shard_shape(a.shape)
            total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
        return total

    m = cfg.model
    n_params = count_params(m)
    schedule = optim.BatchSchedule(cfg.optim, cfg.train, m.context_length)
    micro = schedule.micro_size
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    b_dev = max(micro // n_data, 1)
    T, D, L = m.context_length, m.d_model, m.n_layer
    act_bytes = jnp.dtype(m.dtype).itemsize
    # Saved activations per layer and sequence: under full remat only the block input; otherwise
    # roughly the residual stream, q/k/v, attention output and the MLP hidden (34·T·D-ish bytes in
    # bf16, as in Korthikanti et al.), split over the tensor axis except the residual stream.
    tensor = mesh.shape["tensor"]
    if m.remat == "full":
        per_layer = T * D * act_bytes
    else:
        per_layer = T * D * act_bytes * (2 + (4 * 1 + 2 * m.d_ff / D) / tensor)
    act = per_layer * L * b_dev + b_dev * T * m.padded_vocab_size * 4 / tensor * 2
    flops_step = flops_per_token(m) * cfg.train.batch_size * T
    budget = cfg.train.total_tokens
    train_flops = flops_per_token(m) * budget
    peak = (peak_tflops or cfg.train.peak_tflops or 0) * 1e12 or device_peak_flops() or 125e12
    lines = [
        f"config: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, context {T}",
        f"parameters: {n_params:,} ({n_params / 1e9:.2f}B)",
        f"mesh: {dict(mesh.shape)} ({mesh.devices.size} devices, {jax.devices()[0].platform})",
        f"per device: params {per_device(abs_state.params) / 2**30:.2f} GiB, optimizer state "
        f"{per_device(abs_state.opt_state) / 2**30:.2f} GiB, activations ~{act / 2**30:.2f} GiB "
        f"(microbatch {b_dev} sequences per device, remat "
        f"{'auto, estimated for none' if m.remat == 'auto' else m.remat})",
        f"FLOPs per step: {flops_step:.3e} ({cfg.train.batch_size} x {T} tokens, "
        f"{flops_per_token(m):.3e} per token)",
        f"training budget: {budget:.3e} tokens -> {train_flops:.3e} FLOPs = "
        f"{train_flops / (peak * mfu) / 86400:,.0f} device-days "
        f"({train_flops / (peak * mfu) / 86400 / 365:,.1f} device-years) at {mfu:.0%} MFU of "
        f"{peak / 1e12:.0f} TFLOP/s",
    ]
    if micro % n_data:
        lines.append(f"note: a microbatch of {micro} sequences does not split over {n_data} "
                     f"data-parallel devices; training needs train.microbatches dividing "
                     f"{cfg.train.batch_size} with batch_size / microbatches a multiple of "
                     f"{n_data} (fewer microbatches means a coarser batch ramp)")
    if compile_step is None:
        compile_step = n_params < 3e9
    if compile_step:
        b_abs = batch_abstract(mesh, 1, micro, T)

        def compile_for(mc: ModelConfig) -> Any:
            return compile_train_step(mc, tx, mesh, state_sh, abs_state, b_abs)

        with sharding.activate(mesh):
            if m.remat == "auto":
                try:
                    chosen, (compiled,), tried = choose_remat(m, lambda mc: [compile_for(mc)])
                    lines.append(f"model.remat=auto: {chosen.remat} on this device "
                                 f"({remat_needs_text(tried)})")
                except UserError as e:
                    compiled = None
                    lines.append(str(e))
            else:
                compiled = compile_for(m)
        ma = compiled.memory_analysis() if compiled is not None else None
        if ma is not None:
            lines.append(
                f"XLA memory analysis per device: arguments {ma.argument_size_in_bytes / 2**30:.2f} "
                f"GiB, outputs {ma.output_size_in_bytes / 2**30:.2f} GiB, temporaries "
                f"{ma.temp_size_in_bytes / 2**30:.2f} GiB"
            )
    else:
        lines.append("XLA memory analysis: skipped (compiling a step this size on emulated CPU "
                     "devices takes too long; pass --compile to try)")
    return "\n".join(lines)


def replace_cfg(cfg: Config, **sections: dict[str, Any]) -> Config:
    """cfg with some fields of some sections replaced: replace_cfg(cfg, train={"steps": 3})."""
    parts = {name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    return dataclasses.replace(cfg, **parts)
