"""`train.py --dry-run`: what a run needs per device before it runs, with no weights allocated.

Without a topology it estimates memory and FLOPs on the devices here (emulated CPU devices for a
mesh of explicit sizes) and, below 3B parameters, compiles the step on them for XLA's figure.
With `--topology` it compiles the train step the loop runs for a Cloud TPU slice, with the real
XLA:TPU compiler on whatever host this is, and reports XLA's memory per chip against the chip's
HBM (model.remat=auto resolved against it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gptjax import sharding
from gptjax.aot import memory
from gptjax.aot.topology import TPU_CHIPS, Slice
from gptjax.config import Config, ModelConfig
from gptjax.errors import UserError
from gptjax.model import count_params, flops_per_token
from gptjax.train import optim
from gptjax.train.plan import (GPT3_GPU_YEARS, choose_remat, device_peak_flops,
                               remat_needs_text)
from gptjax.lora.adapters import LoraSpec
from gptjax.train.state import abstract_params, abstract_state, batch_abstract, compile_train_step

GIB = memory.GIB


@dataclasses.dataclass
class DryRun:
    """A dry run's report: the lines it prints and the same facts as a record (for results
    files)."""

    lines: list[str] = dataclasses.field(default_factory=list)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def activation_bytes(m: ModelConfig, mesh: Mesh, seqs_per_device: int) -> float:
    """What the step holds per device beyond the state and gradients, estimated: the saved
    activations and the loss's logits.

    Per layer and sequence, with no remat, T·D·itemsize·(4 + 19/tensor) bytes: the coefficients
    are fitted to XLA:TPU's memory analysis of every preset on its slices
    (results/tpu-aot.jsonl; tests/test_tpu_aot.py keeps the estimate within 25% of it). That is
    more than the saved tensors alone (Korthikanti et al.'s 34·T·D bytes in 16 bits, with
    flash attention): XLA's temporaries also hold fusion outputs and the gathered weights. Under
    full remat each layer keeps only its input, and one layer's activations exist at a time
    during the backward pass; under "dots" the matmul outputs stay (about half). The loss holds
    one chunk of fp32 logits and its gradient (model.loss_chunk positions; all T without)."""
    T, D = m.context_length, m.d_model
    itemsize = jnp.dtype(m.dtype).itemsize
    tensor = mesh.shape["tensor"]
    layer = T * D * itemsize * (4 + 19 / tensor)
    if m.remat == "full":
        per_seq = T * D * itemsize * m.n_layer + layer
    elif m.remat == "dots":
        per_seq = layer * m.n_layer / 2 + layer
    else:
        per_seq = layer * m.n_layer
    chunk = min(m.loss_chunk or T, T)
    logits = chunk * m.padded_vocab_size * 4 * 2 / tensor
    return (per_seq + logits) * seqs_per_device


def estimate(cfg: Config, mesh: Mesh, abs_state: Any, seqs_per_device: int,
             n_micro: int) -> dict[str, float]:
    """Bytes per device by our own accounting: the state (parameters, Adam's moments), the
    gradients (fp32; a second copy accumulates over microbatches), saved activations. Under
    LoRA the state is the adapters', and the parameters add the frozen base."""
    params = memory.bytes_per_device(abs_state.params)
    if LoraSpec.of(cfg.train) is not None:
        params += memory.bytes_per_device(abstract_params(cfg, mesh)[0])
    opt = memory.bytes_per_device(abs_state.opt_state)
    grad_one = memory.bytes_per_device(abs_state.params, itemsize=4)
    grads = grad_one * (2 if n_micro > 1 else 1)
    act = activation_bytes(cfg.model, mesh, seqs_per_device)
    return {"params": params, "optimizer": opt, "gradients": grads, "activations": act,
            "total": params + opt + grads + act}


def compile_step(cfg: Config, mesh: Mesh, n_micro: int, micro: int, limit_gib: float | None,
                 margin: float = 0.9, limit_text: str | None = None
                 ) -> tuple[list[str], dict[str, Any]]:
    """Compiles the step the loop runs (model.remat=auto resolved against margin × limit_gib;
    -1: this device's limit) and reads XLA's memory analysis: (lines, record)."""
    m, tx = cfg.model, optim.make_optimizer(cfg.optim)
    seconds: dict[str, float] = {}
    # The abstract state is built outside the mesh scope: under a mesh of a TPU slice's devices
    # (no client to run on), eval_shape's init would try to run its constants there.
    abs_state, state_sh = abstract_state(cfg, mesh, tx)
    lora = LoraSpec.of(cfg.train)
    base_abs = abstract_params(cfg, mesh)[0] if lora else None
    b_abs = batch_abstract(mesh, n_micro, micro, m.context_length)
    refused: set[str] = set()  # policies whose program XLA refused as too large

    def compile_for(mc: ModelConfig) -> Any:
        t0 = time.perf_counter()
        try:
            compiled, seconds[mc.remat] = memory.timed_compile(
                lambda: compile_train_step(mc, tx, mesh, state_sh, abs_state, b_abs, lora,
                                           base_abs),
                aot=mesh.devices.flat[0].platform == "tpu")
        except Exception as e:
            if memory.out_of_memory(e):  # a refusal took its compile time too
                refused.add(mc.remat)
                seconds[mc.remat] = time.perf_counter() - t0
            raise
        return compiled

    def no_fit(lines: list[str], tried: dict[str, float | None]) -> tuple[list[str], dict]:
        known = [v for v in tried.values() if v is not None]
        return lines, {"remat": None if m.remat == "auto" else m.remat, "remat_tried": tried,
                       "refused": sorted(refused), "fits": False, "compile_s": seconds,
                       "need_at_least_gib": min(known) if known else None}

    with sharding.activate(mesh):
        lines: list[str] = []
        record: dict[str, Any] = {"remat": m.remat}
        if m.remat == "auto":
            tried: dict[str, float | None] = {}
            try:
                chosen, (compiled,), _ = choose_remat(
                    m, lambda mc: [compile_for(mc)], limit_gib=limit_gib, margin=margin,
                    limit_text=limit_text, tried=tried)
            except UserError as e:
                return no_fit([str(e)], tried)
            record.update(remat=chosen.remat, remat_tried=tried, refused=sorted(refused))
            lines.append(f"model.remat=auto: {chosen.remat} "
                         f"({remat_needs_text(tried, refused)})")
        else:
            try:
                compiled = compile_for(m)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is a finding
                if not memory.out_of_memory(e):
                    raise
                need = memory.oom_need_gib(e)
                said = "" if need is None else f" (it needs at least {memory.gib_text(need)})"
                return no_fit([f"XLA refused the program as too large for the device{said}"],
                              {m.remat: need})
    record["compile_s"] = seconds
    lines.append(f"compile: {sum(seconds.values()):.1f} s ("
                 + ", ".join(f"remat {k} {v:.1f} s" for k, v in seconds.items()) + ")")
    mem = memory.analyse(compiled)
    if mem is not None:
        lines.append(f"XLA memory per device: {mem.text()}")
        record.update(mem.as_dict())
    if mesh.devices.flat[0].platform == "tpu":
        record["mosaic_calls"] = memory.mosaic_calls(compiled)
        lines.append(f"Mosaic kernel calls in the step: {record['mosaic_calls']} (attention "
                     f"{cfg.model.attention_impl})")
    return lines, record


def dry_run(cfg: Config, mesh: Mesh, *, compile: bool | None = None, mfu: float = 0.5,
            peak_tflops: float | None = None, chip: str | None = None,
            target: Slice | None = None) -> DryRun:
    """Per-device memory and FLOPs of a config on a mesh, with no weights allocated.
    compile: also compile the step for XLA's memory analysis (None: below 3B parameters, or
    always for a target slice). chip: a TPU_CHIPS name to plan for (its peak and HBM) whatever
    devices are here. target: the TPU slice whose devices `mesh` holds (compiled for by XLA)."""
    out = DryRun()
    tx = optim.make_optimizer(cfg.optim)
    abs_state, _ = abstract_state(cfg, mesh, tx)
    m = cfg.model
    n_params = count_params(m)
    schedule = optim.BatchSchedule(cfg.optim, cfg.train, m.context_length)
    micro, n_micro = schedule.micro_size, cfg.train.microbatches
    n_data = sharding.data_parallel_size(mesh)
    b_dev = max(micro // n_data, 1)
    est = estimate(cfg, mesh, abs_state, b_dev, n_micro)
    fpt = flops_per_token(m)
    budget = cfg.train.total_tokens
    if target is not None:
        chip = target.chip
    peak = (peak_tflops or cfg.train.peak_tflops or 0) * 1e12 or device_peak_flops() or 125e12
    if chip is not None:
        peak = TPU_CHIPS[chip][0]
    days = fpt * budget / (peak * mfu) / 86400
    n_dev = mesh.devices.size
    platform = jax.devices()[0].platform if target is None else f"TPU {target.chip}"
    where = (f"{target.topology}, {n_dev} {target.chip} chips, compiled on this host by XLA:TPU"
             if target is not None else f"{n_dev} devices, {platform}")
    out.lines += _plan_lines(cfg, mesh, est, b_dev, where, days, peak, mfu)
    out.record.update(
        n_params=n_params, mesh=dict(mesh.shape), n_devices=n_dev, microbatches=n_micro,
        seqs_per_device=b_dev, estimate_gib=est["total"] / GIB,
        estimate={k: v / GIB for k, v in est.items()}, chip_days=days,
        platform=platform)
    if chip is not None:
        out.lines += _chip_lines(chip, n_dev, est["total"] / GIB if target is None else None,
                                 days)
    if micro % n_data:
        note = (f"a microbatch of {micro} sequences does not split over {n_data} "
                f"data-parallel devices; training needs train.microbatches dividing "
                f"{cfg.train.batch_size} with batch_size / microbatches a multiple of {n_data} "
                f"(fewer microbatches means a coarser batch ramp)")
        if target is not None:  # there is no step to compile for the slice
            raise UserError(f"--topology {target.topology}: {note}")
        out.lines.append(f"note: {note}")
        compile = False
    if compile is None:
        compile = target is not None or n_params < 3e9
    if not compile:
        out.lines.append("XLA memory analysis: skipped" + (
            " (the microbatch does not split)" if micro % n_data else
            " (compiling a step this size on emulated CPU devices takes too long; pass "
            "--compile to try)"))
        return out
    if target is None:
        lines, rec = compile_step(cfg, mesh, n_micro, micro, -1)
        out.lines += lines
        out.record.update(rec)
    else:
        _compile_for_target(out, cfg, mesh, target, n_micro, micro)
    return out


def _compile_for_target(out: DryRun, cfg: Config, mesh: Mesh, target: Slice, n_micro: int,
                        micro: int) -> None:
    """The step compiled for a TPU slice, and whether it fits the chip's HBM. On a TPU XLA's
    figure is exact and its compiler refuses what cannot fit: no margin."""
    hbm = target.hbm_gib
    lines, rec = compile_step(cfg, mesh, n_micro, micro, hbm, margin=1.0,
                              limit_text=f"the {hbm:g} GiB HBM of a {target.chip} chip")
    out.lines += lines
    out.record.update(rec)
    need = rec.get("need_gib")
    fits = out.record["fits"] = rec.get("fits", need is not None and need <= hbm)
    if need is not None:
        said = f"XLA needs {memory.gib_text(need)}"
    elif rec.get("need_at_least_gib") is not None:
        said = f"XLA needs at least {memory.gib_text(rec['need_at_least_gib'])}"
    else:
        said = "XLA refused the program"
    out.lines.append(f"per chip ({target.chip}, {hbm:g} GiB HBM): {said} -> "
                     f"{'fits' if fits else 'does NOT fit'}")


def _plan_lines(cfg: Config, mesh: Mesh, est: dict[str, float], b_dev: int, where: str,
                days: float, peak: float, mfu: float) -> list[str]:
    """The dry run's first lines: the model, the mesh, the estimate, FLOPs and the budget."""
    m, T = cfg.model, cfg.model.context_length
    n_params, fpt = count_params(m), flops_per_token(m)
    budget = cfg.train.total_tokens
    return [
        f"config: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, context {T}",
        f"parameters: {n_params:,} ({n_params / 1e9:.2f}B)",
        f"mesh: {dict(mesh.shape)} ({where})",
        f"per device, estimated: params {est['params'] / GIB:.2f} GiB, optimizer state "
        f"{est['optimizer'] / GIB:.2f} GiB, gradients {est['gradients'] / GIB:.2f} GiB, "
        f"activations ~{est['activations'] / GIB:.2f} GiB (microbatch {b_dev} sequences per "
        f"device, remat {'auto, estimated for none' if m.remat == 'auto' else m.remat}) "
        f"= ~{est['total'] / GIB:.2f} GiB",
        f"FLOPs per step: {fpt * cfg.train.batch_size * T:.3e} ({cfg.train.batch_size} x {T} "
        f"tokens, {fpt:.3e} per token)",
        f"training budget: {budget:.3e} tokens -> {fpt * budget:.3e} FLOPs = {_days(days)} at "
        f"{mfu:.0%} MFU of "
        f"{peak / 1e12:.0f} TFLOP/s",
    ]


def _days(days: float) -> str:
    """Device-days, with years for long budgets and hours for short ones (a 10B-token run is
    hours, not "0 device-days")."""
    if days >= 365:
        return f"{days:,.0f} device-days ({days / 365:,.1f} device-years)"
    return f"{days:,.0f} device-days" if days >= 10 else \
        f"{days:.2f} device-days ({days * 24:.1f} device-hours)"


def _chip_lines(chip: str, n_devices: int, estimate_gib: float | None,
                days: float) -> list[str]:
    """What a dry run for a named TPU chip adds: the time on it, and (estimated, where XLA is
    not asked) whether the step fits its HBM."""
    _, hbm = TPU_CHIPS[chip]
    lines = []
    if estimate_gib is not None:
        fits = "fits" if estimate_gib <= hbm else "does NOT fit"
        lines.append(f"per chip ({chip}, {hbm} GiB HBM): ~{estimate_gib:.1f} GiB estimated -> "
                     f"{fits} (XLA and its buffers need some margin; --topology asks XLA)")
    lines.append(f"on {n_devices} {chip} chips: {days:,.0f} chip-days = "
                 f"{days / n_devices:,.1f} days of the slice (GPT-3 175B for scale: "
                 f"~{GPT3_GPU_YEARS} V100 GPU-years, {GPT3_GPU_YEARS * 365:,} GPU-days)")
    return lines
