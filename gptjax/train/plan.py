"""What a run costs before it runs: the chip's peak FLOPs (for MFU), the remat policy that fits
the device (`model.remat=auto`), and the dry run's memory and FLOPs report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gptjax import sharding
from gptjax.train import optim
from gptjax.config import Config, ModelConfig
from gptjax.errors import UserError
from gptjax.model import count_params, flops_per_token
from gptjax.train.state import abstract_state, batch_abstract, compile_train_step

# Dense bf16 matmul peak per chip, FLOP/s, by jax's device_kind (first substring match wins, so a
# form factor stands before its family). GPUs: H100/H200 SXM 989, PCIe 756, NVL 835 (NVIDIA's
# datasheets, without sparsity); jax names the SXM parts plainly ("NVIDIA H100 80GB HBM3",
# "NVIDIA H200"). TPU device kinds as jax names them (jax/_src/pallas/mosaic/tpu_info.py): v5e
# reports "TPU v5 lite" or "TPU v5e", v5p "TPU v5" or "TPU v5p", v6e "TPU v6 lite" or "TPU v6e";
# so "TPU v5" comes after both v5e spellings, which contain it.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("A10", 125e12), ("V100", 125e12), ("TPU v6", 918e12), ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)
# Cloud TPU chips a dry run can plan for without one (train.py --dry-run --chip NAME): bf16 peak
# FLOP/s and HBM GiB per chip, from Google Cloud's TPU version pages.
TPU_CHIPS = {"v4": (275e12, 32), "v5e": (197e12, 16), "v5p": (459e12, 95), "v6e": (918e12, 32)}
# For scale: GPT-3 175B's 3.14e23 training FLOPs (Brown et al. 2020, Table D.1) at a V100's
# 28 TFLOP/s sustained are 355 GPU-years (Lambda's widely quoted estimate).
GPT3_GPU_YEARS = 355
REMAT_TRY_ORDER = ("none", "dots", "full")  # model.remat=auto: least recomputation first


def device_peak_flops(override_tflops: float = 0.0) -> float | None:
    """The first device's bf16 peak, FLOP/s (override_tflops > 0 replaces it); None if unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


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


def device_memory_limit_gib() -> float | None:
    """What JAX may allocate on each device (XLA_PYTHON_CLIENT_MEM_FRACTION of a GPU's memory,
    75% by JAX's default), the least over all processes; None where no device reports one
    (the CPU)."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    limit = float((stats or {}).get("bytes_limit") or -1)
    if jax.process_count() > 1:  # every process must compile the same program
        limits = np.asarray(multihost_utils.process_allgather(np.float64(limit)))
        known = limits[limits > 0]
        limit = float(known.min()) if known.size else -1.0
    return limit / 2**30 if limit > 0 else None


def choose_remat(model_cfg: ModelConfig, compile_fn: Callable[[ModelConfig], list[Any]],
                 limit_gib: float | None = -1, margin: float = 0.9
                 ) -> tuple[ModelConfig, list[Any], dict[str, float | None]]:
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
    for policy in REMAT_TRY_ORDER:
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


# --------------------------------------------------------------------------- dry run


def _bytes_per_device(tree: Any) -> int:
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree))


def _activation_bytes(m: ModelConfig, mesh: Mesh, seqs_per_device: int) -> float:
    """Saved activations per device, estimated. Under full remat only each block's input;
    otherwise roughly the residual stream, q/k/v, attention output and the MLP hidden
    (Korthikanti et al.'s accounting), split over the tensor axis except the residual stream;
    plus the fp32 logits and their gradient."""
    T, D = m.context_length, m.d_model
    itemsize = jnp.dtype(m.dtype).itemsize
    tensor = mesh.shape["tensor"]
    if m.remat == "full":
        per_layer = T * D * itemsize
    else:
        per_layer = T * D * itemsize * (2 + (4 + 2 * m.d_ff / D) / tensor)
    logits = T * m.padded_vocab_size * 4 / tensor * 2
    return (per_layer * m.n_layer + logits) * seqs_per_device


def _compiled_memory_lines(cfg: Config, mesh: Mesh, micro: int) -> list[str]:
    """XLA's memory analysis of the step (model.remat=auto resolved on this device)."""
    m, tx = cfg.model, optim.make_optimizer(cfg.optim)
    with sharding.activate(mesh):
        abs_state, state_sh = abstract_state(cfg, mesh, tx)
        b_abs = batch_abstract(mesh, 1, micro, m.context_length)

        def compile_for(mc: ModelConfig) -> Any:
            return compile_train_step(mc, tx, mesh, state_sh, abs_state, b_abs)

        lines = []
        if m.remat == "auto":
            try:
                chosen, (compiled,), tried = choose_remat(m, lambda mc: [compile_for(mc)])
            except UserError as e:
                return [str(e)]
            lines.append(f"model.remat=auto: {chosen.remat} on this device "
                         f"({remat_needs_text(tried)})")
        else:
            compiled = compile_for(m)
    ma = compiled.memory_analysis()
    if ma is not None:
        lines.append(f"XLA memory analysis per device: arguments "
                     f"{ma.argument_size_in_bytes / 2**30:.2f} GiB, outputs "
                     f"{ma.output_size_in_bytes / 2**30:.2f} GiB, temporaries "
                     f"{ma.temp_size_in_bytes / 2**30:.2f} GiB")
    return lines


def _chip_lines(chip: str, n_devices: int, per_device_gib: float, days: float) -> list[str]:
    """What a dry run for a named TPU chip adds: whether the state fits its HBM, and the time."""
    _, hbm = TPU_CHIPS[chip]
    fits = "fits" if per_device_gib <= hbm else "does NOT fit"
    return [
        f"per chip ({chip}, {hbm} GiB HBM): ~{per_device_gib:.1f} GiB estimated -> {fits} "
        f"(params + optimizer state + activations; XLA and its buffers need some margin)",
        f"on {n_devices} {chip} chips: {days:,.0f} chip-days = {days / n_devices:,.1f} days "
        f"of the slice (GPT-3 175B for scale: ~{GPT3_GPU_YEARS} V100 GPU-years, "
        f"{GPT3_GPU_YEARS * 365:,} GPU-days)",
    ]


def dry_run(cfg: Config, mesh: Mesh, *, compile_step: bool | None = None,
            mfu: float = 0.5, peak_tflops: float | None = None, chip: str | None = None) -> str:
    """Per-device memory and FLOPs of a config on a mesh, with no weights allocated.
    compile_step: also compile the step for XLA's memory analysis (None: below 3B parameters).
    chip: a TPU_CHIPS name to plan for: its peak and HBM per chip, whatever devices are here."""
    tx = optim.make_optimizer(cfg.optim)
    with sharding.activate(mesh):
        abs_state, _ = abstract_state(cfg, mesh, tx)
    m = cfg.model
    n_params = count_params(m)
    schedule = optim.BatchSchedule(cfg.optim, cfg.train, m.context_length)
    micro = schedule.micro_size
    n_data = sharding.data_parallel_size(mesh)
    b_dev = max(micro // n_data, 1)
    T = m.context_length
    act = _activation_bytes(m, mesh, b_dev)
    fpt = flops_per_token(m)
    budget = cfg.train.total_tokens
    peak = (peak_tflops or cfg.train.peak_tflops or 0) * 1e12 or device_peak_flops() or 125e12
    if chip is not None:
        peak = TPU_CHIPS[chip][0]
    days = fpt * budget / (peak * mfu) / 86400
    params_b, opt_b = _bytes_per_device(abs_state.params), _bytes_per_device(abs_state.opt_state)
    lines = [
        f"config: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, context {T}",
        f"parameters: {n_params:,} ({n_params / 1e9:.2f}B)",
        f"mesh: {dict(mesh.shape)} ({mesh.devices.size} devices, {jax.devices()[0].platform})",
        f"per device: params {params_b / 2**30:.2f} GiB, optimizer "
        f"state {opt_b / 2**30:.2f} GiB, activations "
        f"~{act / 2**30:.2f} GiB (microbatch {b_dev} sequences per device, remat "
        f"{'auto, estimated for none' if m.remat == 'auto' else m.remat})",
        f"FLOPs per step: {fpt * schedule.full_tokens:.3e} ({cfg.train.batch_size} x {T} "
        f"tokens, {fpt:.3e} per token)",
        f"training budget: {budget:.3e} tokens -> {fpt * budget:.3e} FLOPs = {days:,.0f} "
        f"device-days ({days / 365:,.1f} device-years) at {mfu:.0%} MFU of "
        f"{peak / 1e12:.0f} TFLOP/s",
    ]
    if chip is not None:
        lines += _chip_lines(chip, mesh.devices.size, (params_b + opt_b + act) / 2**30, days)
    if micro % n_data:
        lines.append(f"note: a microbatch of {micro} sequences does not split over {n_data} "
                     f"data-parallel devices; training needs train.microbatches dividing "
                     f"{cfg.train.batch_size} with batch_size / microbatches a multiple of "
                     f"{n_data} (fewer microbatches means a coarser batch ramp)")
    if compile_step is None:
        compile_step = n_params < 3e9
    if compile_step:
        lines += _compiled_memory_lines(cfg, mesh, micro)
    else:
        lines.append("XLA memory analysis: skipped (compiling a step this size on emulated CPU "
                     "devices takes too long; pass --compile to try)")
    return "\n".join(lines)
