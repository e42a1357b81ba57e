"""XLA's own memory figures for a compiled program, per device, and how to report them."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

GIB = 2**30
# XLA:TPU refuses a program that cannot fit, in one of two forms (sizes in K, M, G or T):
# "Ran out of memory on HBM, the total memory required for HLO temporaries (54.59G) exceeds
# available HBM (31.25G)" (libtpu 0.0.42: temporaries alone, so a lower bound of the need), and
# "Ran out of memory in memory space hbm. Used 40.51G of 15.75G hbm".
_OOM = re.compile(r"(?:required for HLO temporaries \(|Used )([\d.]+)([KMGT])?")
_UNIT = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def bytes_per_device(tree: Any, itemsize: int | None = None) -> int:
    """Bytes one device holds of a tree of sharded arrays or shape structs (each leaf's shard;
    itemsize: count every element at this size instead of its dtype's)."""
    import jax
    import numpy as np

    return sum(math.prod(a.sharding.shard_shape(a.shape))
               * (itemsize or np.dtype(a.dtype).itemsize) for a in jax.tree.leaves(tree))


def gib_text(gib: float) -> str:
    """A size for a report: GiB to two places, MiB below a tenth of a GiB."""
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device by XLA's memory analysis of one compiled program."""

    arguments: int
    outputs: int
    temporaries: int
    aliases: int  # outputs that reuse a donated argument's buffer

    @property
    def need(self) -> int:
        """What the program holds at its peak: its arguments, outputs and temporaries, less the
        outputs written into donated arguments."""
        return self.arguments + self.outputs + self.temporaries - self.aliases

    def text(self) -> str:
        return ", ".join(f"{k} {gib_text(v / GIB)}" for k, v in (
            ("arguments", self.arguments), ("outputs", self.outputs),
            ("temporaries", self.temporaries), ("aliased", self.aliases))
        ) + f" -> needs {gib_text(self.need / GIB)}"

    def as_dict(self) -> dict[str, float]:
        return {"arguments_gib": self.arguments / GIB, "outputs_gib": self.outputs / GIB,
                "temporaries_gib": self.temporaries / GIB, "aliases_gib": self.aliases / GIB,
                "need_gib": self.need / GIB}


def analyse(compiled: Any) -> Memory | None:
    """XLA's memory analysis of a compiled program; None where the backend gives none."""
    try:
        ma = compiled.memory_analysis()
        return Memory(ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes,
                      ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - some backends give no analysis
        return None


def out_of_memory(e: BaseException) -> bool:
    """Whether a compile failed because the program cannot fit the device."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def oom_need_gib(e: BaseException) -> float | None:
    """The GiB XLA:TPU said a program that did not fit would use at least, from its error; None
    if the message gives no figure."""
    m = _OOM.search(str(e))
    return None if m is None else float(m.group(1)) * _UNIT[m.group(2)] / GIB


def timed_compile(compile_fn: Callable[[], Any], *, aot: bool = False) -> tuple[Any, float]:
    """(compiled program, seconds it took to lower and compile). aot: compiled for devices this
    host does not have, and kept out of JAX's persistent compilation cache (where one is set):
    a TPU program compiled with no TPU client cannot be read back from it (JAX would warn and
    compile again), so none is written."""
    import jax

    key = "jax_persistent_cache_min_compile_time_secs"
    was = jax.config.values[key]
    if aot:
        jax.config.update(key, float("inf"))
    t0 = time.perf_counter()
    try:
        compiled = compile_fn()
    finally:
        jax.config.update(key, was)
    return compiled, time.perf_counter() - t0


def mosaic_calls(compiled: Any) -> int:
    """Mosaic (Pallas TPU) kernel calls in a compiled TPU program's HLO: splash's forward and
    backward kernels where the program runs them."""
    return compiled.as_text().count("tpu_custom_call")


def fits_text(need_gib: float | None, hbm_gib: float) -> str:
    if need_gib is None:
        return "unknown (XLA gave no memory analysis)"
    word = "fits" if need_gib <= hbm_gib else "does NOT fit"
    return f"{gib_text(need_gib)} of {hbm_gib:g} GiB HBM -> {word}"
