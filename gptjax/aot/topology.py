"""Cloud TPU slices a CPU host can compile for: slice names, chips, and their devices.

`devices("v5p-1024")` gives the 512 devices of a v5p 8x8x8 slice from libtpu's topology
description, with no TPU attached: a jit lowered and compiled on a mesh of them runs the real
XLA:TPU compiler (Mosaic kernels included) on this host, ahead of time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from typing import Any

from jax.sharding import Mesh

from gptjax import sharding
from gptjax.config import MeshConfig
from gptjax.errors import UserError

# Cloud TPU chips: bf16 peak FLOP/s and HBM GiB per chip (Google Cloud's TPU version pages),
# and the dimensions of the chip grid (v5e and v6e slices are 2-D, v4 and v5p 3-D tori).
TPU_CHIPS = {"v4": (275e12, 32), "v5e": (197e12, 16), "v5p": (459e12, 95), "v6e": (918e12, 32)}
GRID_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
# The prefixes of Cloud TPU accelerator types, and whether their number counts TensorCores
# (two per v4 or v5p chip) rather than chips.
SLICE_PREFIXES = {"v4": ("v4", True), "v5p": ("v5p", True), "v5litepod": ("v5e", False),
                  "v5e": ("v5e", False), "v6e": ("v6e", False)}
INSTALL_HINT = "pip install -e '.[tpu]' (it brings libtpu)"


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: chip generation, the topology name jax takes (v5p:8x8x8), and chip count."""

    chip: str
    topology: str
    n_chips: int

    @property
    def hbm_gib(self) -> float:
        return TPU_CHIPS[self.chip][1]

    @property
    def peak_flops(self) -> float:
        return TPU_CHIPS[self.chip][0]


def grid(chip: str, n_chips: int) -> tuple[int, ...] | None:
    """The chip grid Cloud TPU builds for n_chips of this generation: from 2x2 (2-D) or 2x2x1
    (3-D), double the smallest dimension, the last of equals first (v5p: 2x2x1, 2x2x2, 2x2x4,
    2x4x4, 4x4x4, ... 8x8x8; v5e: 2x2, 2x4, 4x4, ... 16x16); one chip is 1x1. None if n_chips is
    no such count."""
    dims = GRID_DIMS[chip]
    if n_chips == 1 and dims == 2:
        return (1, 1)
    shape = [2, 2] if dims == 2 else [2, 2, 1]
    while math.prod(shape) < n_chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape) if math.prod(shape) == n_chips else None


def parse(name: str) -> Slice:
    """A slice from jax's topology spelling (v5e:2x2, v5p:8x8x8) or a Cloud TPU accelerator type
    (v5p-1024 counts TensorCores: 512 chips; v5litepod-16 and v6e-256 count chips). v4 is
    refused: libtpu describes a v4 slice with a device per TensorCore, where JAX on a v4 runs
    one per chip (megacore), so its compiles would not be the programs a v4 runs."""
    sl = _parse(name)
    if sl.chip == "v4":
        raise UserError(f"--topology {name}: v4 slices are not supported (libtpu describes them "
                        f"core by core, not chip by chip as JAX runs them); plan a v4 with "
                        f"--chip v4 instead")
    return sl


def _parse(name: str) -> Slice:
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name)
    if m:
        chip, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        if len(dims) != GRID_DIMS[chip] or 0 in dims:
            raise UserError(f"--topology {name}: a {chip} slice is a {GRID_DIMS[chip]}-D grid of "
                            f"chips, e.g. {_example(chip)}")
        return Slice(chip, name, math.prod(dims))
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if m:
        chip, per_core = SLICE_PREFIXES[m.group(1)]
        count = int(m.group(2))
        n_chips = count // 2 if per_core else count
        shape = grid(chip, n_chips) if n_chips and (not per_core or count % 2 == 0) else None
        if shape is None:
            raise UserError(f"--topology {name}: no {chip} slice of that size (sizes double from "
                            f"{_example(chip, cloud=True)})")
        return Slice(chip, f"{chip}:{'x'.join(map(str, shape))}", n_chips)
    raise UserError(f"--topology {name}: unknown TPU slice; give jax's topology name (v5e:2x2, "
                    f"v5p:8x8x8, v6e:16x16) or a Cloud TPU accelerator type (v5litepod-16, "
                    f"v5p-1024, v6e-256)")


def _example(chip: str, cloud: bool = False) -> str:
    if cloud:
        return {"v4": "v4-8", "v5p": "v5p-8", "v5e": "v5litepod-1", "v6e": "v6e-1"}[chip]
    return f"{chip}:2x2" if GRID_DIMS[chip] == 2 else f"{chip}:2x2x1"


def require_libtpu() -> None:
    """One line, with the install command, where libtpu (the TPU compiler) is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"--topology needs libtpu, the TPU compiler, and it is not installed: "
                        f"{INSTALL_HINT}")


@functools.lru_cache(maxsize=None)
def devices(name: str) -> tuple[Any, ...]:
    """The slice's devices, for a Mesh that jit can compile for on any host."""
    sl = parse(name)
    require_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=sl.topology)
    except Exception as e:  # noqa: BLE001 - libtpu's reasons vary; one line says which
        raise UserError(f"--topology {name}: libtpu cannot describe {sl.topology}: "
                        f"{(str(e).strip().splitlines() or [repr(e)])[0]}") from None
    return tuple(desc.devices)


def for_slice(cfg: MeshConfig, name: str) -> tuple[Slice, Mesh]:
    """What a dry run for a slice needs: the slice and the mesh of `cfg` over its chips. This
    host's own devices stay on the CPU: nothing touches a TPU that may or may not be here."""
    import jax

    target = parse(name)
    require_libtpu()
    jax.config.update("jax_platforms", "cpu")
    return target, slice_mesh(cfg, name)


def slice_mesh(cfg: MeshConfig, name: str) -> Mesh:
    """The mesh of `cfg` over the slice's chips (-1 takes what the others leave)."""
    sl = parse(name)
    chips = list(devices(name))
    try:
        sharding.mesh_shape(cfg, sl.n_chips)
    except UserError:
        raise UserError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} does not fit "
                        f"--topology {name}: the slice has {sl.n_chips} {sl.chip} chips, and "
                        f"data x fsdp x tensor must multiply to that") from None
    return sharding.make_mesh(cfg, chips)
