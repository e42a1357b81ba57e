"""The only module that knows mesh axis names: the mesh, ONE table of logical-axis rules, and
shardings for parameters, optimizer state, batches and KV caches.

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel whose replicas each hold
a shard of every parameter and optimizer state), `tensor` (Megatron-style: heads and MLP
columns split across devices).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import MeshConfig, ModelConfig
from gptjax.errors import UserError
from gptjax.model import GPT, init_params

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis → mesh axes. Flax applies a rule only when its mesh axes are still free in that
# array, so activations ("batch", "length", "embed") shard batch over data×fsdp and leave embed
# whole, while parameters ("vocab", "embed") shard embed over fsdp.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the mesh uses exactly the devices present."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(
                f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} does not divide "
                f"the {n_devices} devices"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(
            f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} needs "
            f"{math.prod(sizes)} devices, but {n_devices} are present"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Makes the model's logical constraints resolve against `mesh` (tracing must happen inside)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def logical_to_sharding(logical: Any, mesh: Mesh) -> Any:
    """A tree of logical PartitionSpecs → a tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical, mesh, RULES)


def param_specs(cfg: ModelConfig) -> Any:
    """Logical PartitionSpecs of the parameter tree (through eval_shape: no memory)."""
    tokens = jax.ShapeDtypeStruct((1, min(cfg.context_length, 8)), np.int32)
    boxed = jax.eval_shape(lambda k: GPT(cfg).init(k, tokens), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    return logical_to_sharding(param_specs(cfg), mesh)


def init_sharded_params(cfg: ModelConfig, mesh: Mesh, key: jax.Array) -> Any:
    """Parameters created directly in their shards: no device ever holds the whole model."""
    shardings = param_shardings(cfg, mesh)
    with activate(mesh):
        return jax.jit(lambda k: init_params(cfg, k), out_shardings=shardings)(key)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch splits: the product of the mesh's batch axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 2, *, stacked: bool = False) -> NamedSharding:
    """Rows over the batch axes, other dims whole. stacked: dim 0 is the microbatch index of a
    train batch [n_micro, B, T] and the rows are dim 1."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    lead = (None,) if stacked else ()
    return NamedSharding(mesh, P(*lead, axes, *([None] * (ndim - 1 - len(lead)))))


def to_global(local: dict[str, np.ndarray], mesh: Mesh, *, stacked: bool = False
              ) -> dict[str, jax.Array]:
    """This process's rows → global arrays split over the batch axes (see batch_sharding)."""
    axis = 1 if stacked else 0
    out = {}
    for key, value in local.items():
        shape = list(value.shape)
        shape[axis] *= jax.process_count()
        if shape[axis] % data_parallel_size(mesh):
            raise UserError(f"a global batch of {shape[axis]} rows does not divide over the "
                            f"{data_parallel_size(mesh)} data-parallel devices (mesh data×fsdp)")
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, value.ndim, stacked=stacked), value, tuple(shape))
    return out


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """A tree of ShapeDtypeStructs (or arrays) given the matching tree of shardings."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise UserError(f"{what}={batch_size} is not divisible by the {n} data-parallel devices "
                        f"(mesh data×fsdp)")


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """KV cache: batch over the data axes, heads over tensor; index split like the batch."""

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if leaf.ndim == 1:  # index [B]
            return NamedSharding(mesh, P(BATCH_AXES))
        # [B, S, H, K], stacked [layers, B, S, H, K] for the scanned model
        spec = (BATCH_AXES, None, "tensor", None)
        return NamedSharding(mesh, P(*(None,) * (leaf.ndim - 4), *spec))

    return jax.tree_util.tree_map_with_path(one, cache)

