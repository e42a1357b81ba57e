"""What a run costs before it runs: the chip's peak FLOPs (for MFU) and the remat policy that
fits the device (`model.remat=auto`); the dry run's report is dryrun.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax.aot import memory
from gptjax.config import ModelConfig
from gptjax.errors import UserError

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
    """What a compiled program needs on each device by XLA's memory analysis, GiB; None where
    the backend gives none."""
    mem = memory.analyse(compiled)
    return None if mem is None else mem.need / memory.GIB


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
                 limit_gib: float | None = -1, margin: float = 0.9, *,
                 limit_text: str | None = None, tried: dict[str, float | None] | None = None
                 ) -> tuple[ModelConfig, list[Any], dict[str, float | None]]:
    """model.remat=auto: compiles the step with remat none, dots, full in that order and keeps
    the first whose memory need, by XLA's analysis, fits in margin × limit_gib (-1:
    device_memory_limit_gib(); None: the first fits). compile_fn(model_cfg) returns the compiled
    programs the run will use (one per batch shape); the largest need counts. The margin covers
    what the analysis leaves out: fragmentation, cuBLAS/cuDNN workspaces. A compile that runs
    out of memory (TPU compilers refuse a program that cannot fit) counts as not fitting.
    Returns (config with the policy, its compiled programs, GiB needed per policy tried); the
    last is also written into `tried` where given (so a caller has it when none fits).
    limit_text names the limit in the error (default: what JAX may allocate per device)."""
    if limit_gib == -1:
        limit_gib = device_memory_limit_gib()
    tried = {} if tried is None else tried
    refused: set[str] = set()
    for policy in REMAT_TRY_ORDER:
        m = dataclasses.replace(model_cfg, remat=policy)
        try:
            compiled = compile_fn(m)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
            if not memory.out_of_memory(e):
                raise
            tried[policy] = memory.oom_need_gib(e)  # at least this, says XLA:TPU
            refused.add(policy)
            continue
        needs = [memory_need_gib(c) for c in compiled]
        need = tried[policy] = None if None in needs else max(needs)
        if limit_gib is None or need is None or need <= margin * limit_gib:
            return m, compiled, tried
    limit = "" if limit_gib is None else f"{limit_gib:.1f} "
    limit_text = limit_text or f"the {limit}GiB JAX may allocate per device"
    raise UserError(f"model.remat=auto: no remat policy fits {margin:.0%} of {limit_text} "
                    f"({remat_needs_text(tried, refused)}); use more train.microbatches, more "
                    f"devices, or mesh.fsdp")


def remat_needs_text(tried: dict[str, float | None], refused: set[str] = frozenset()) -> str:
    """choose_remat's GiB per policy tried, for a log line; a policy whose program the compiler
    refused as too large shows what it said it needed at least (n/a: it did not say)."""
    def one(k: str, v: float | None) -> str:
        if v is None:
            return f"{k} n/a (refused)" if k in refused else f"{k} n/a"
        return f"{k} >= {memory.gib_text(v)} (refused)" if k in refused else (
            f"{k} {memory.gib_text(v)}")

    return "XLA's memory need per device: " + ", ".join(one(k, v) for k, v in tried.items())
