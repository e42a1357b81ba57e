"""Low-rank adapters (LoRA, Hu et al. 2021) as their own tree beside a frozen base.

A target is one of the block's four projections. Its adapter is a pair A [in..., r] and
B [r, out...] in the base kernel's own axes (so the scanned model's adapters carry its leading
layer axis too), and the projection becomes x·W + (alpha / r)·(x·A)·B. The adapter tree nests as
the parameter tree does (layers/block0/attn/{qkv_a, qkv_b}), with only the adapted modules.

Two forms: the trained adapters (B as trained), and the inference form that the model reads
under params["lora"] (gpt.variables), B already times alpha / r.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import TrainConfig
from gptjax.model import LORA


@dataclasses.dataclass(frozen=True)
class Target:
    module: str  # "attn" | "mlp"
    kernel: str  # the base kernel it adapts
    ndim: int  # that kernel's axes in one layer
    n_in: int  # how many of them are the input's


# Named as the kernels; each maps onto one module of Hugging Face's GPT-2 (hf/peft.py).
TARGETS: dict[str, Target] = {
    "qkv": Target("attn", "qkv_kernel", 4, 1),  # [D, 3, H, K]: c_attn
    "out": Target("attn", "out_kernel", 3, 2),  # [H, K, D]: attn.c_proj
    "fc": Target("mlp", "fc_kernel", 2, 1),  # [D, F]: c_fc
    "proj": Target("mlp", "proj_kernel", 2, 1),  # [F, D]: mlp.c_proj
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    seed: int = 0  # of the dropout masks

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, train: TrainConfig) -> LoraSpec | None:
        """The spec train.lora_* asks for, or None (train.lora_rank=0: full fine-tuning)."""
        if train.lora_rank == 0:
            return None
        return cls(train.lora_rank, train.lora_alpha, tuple(train.lora_targets),
                   train.lora_dropout, train.seed)

    def describe(self) -> str:
        return (f"rank {self.rank}, alpha {self.alpha:g}, targets {','.join(self.targets)}, "
                f"dropout {self.dropout:g}")


def _map(base: Any, spec: LoraSpec, fn: Any, path: tuple[str, ...] = ()) -> Any:
    """{name_a: .., name_b: ..} from fn(Target, kernel, the kernel's path of keys) for every
    targeted kernel in `base`, nested as `base` is; modules without a target are left out."""
    out = {}
    for key, node in base.items():
        if not isinstance(node, dict):
            continue
        here = [n for n in spec.targets if TARGETS[n].module == key and
                TARGETS[n].kernel in node]
        if here:
            out[key] = {}
            for name in here:
                t = TARGETS[name]
                a, b = fn(t, node[t.kernel], (*path, key, t.kernel))
                out[key].update({f"{name}_a": a, f"{name}_b": b})
            continue
        sub = _map(node, spec, fn, (*path, key))
        if sub:
            out[key] = sub
    return out


def _split_shape(t: Target, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    lead = len(shape) - t.ndim
    return shape[:lead], shape[lead:lead + t.n_in], shape[lead + t.n_in:]


def shapes(base: Any, spec: LoraSpec) -> Any:
    """ShapeDtypeStructs (float32) of the adapters of a base tree (arrays or shape structs)."""
    def fn(t: Target, w: Any, _: tuple[str, ...]) -> tuple[jax.ShapeDtypeStruct, ...]:
        lead, ins, outs = _split_shape(t, w.shape)
        return (jax.ShapeDtypeStruct((*lead, *ins, spec.rank), jnp.float32),
                jax.ShapeDtypeStruct((*lead, spec.rank, *outs), jnp.float32))

    return _map(base, spec, fn)


def shardings(base_shardings: Any, base: Any, spec: LoraSpec) -> Any:
    """Each adapter sharded as its base kernel: A as the kernel's input axes (rank whole), B as
    its output axes, both over its layer axis; so a tensor-parallel kernel's B splits with it."""
    def fn(t: Target, w: Any, path: tuple[str, ...]) -> tuple[NamedSharding, NamedSharding]:
        lead, ins, _ = _split_shape(t, w.shape)
        sh = base_shardings
        for k in path:
            sh = sh[k]
        spec_ = tuple(sh.spec) + (None,) * (len(w.shape) - len(sh.spec))
        n = len(lead) + len(ins)
        return (NamedSharding(sh.mesh, P(*spec_[:n], None)),
                NamedSharding(sh.mesh, P(*spec_[:len(lead)], None, *spec_[n:])))

    return _map(base, spec, fn)


def init(key: jax.Array, base: Any, spec: LoraSpec) -> Any:
    """Fresh adapters: A uniform in ±1/sqrt(fan in) (PEFT's default), B zero, so the adapted
    model starts as the base model exactly."""
    abstract = shapes(base, spec)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, a) in zip(keys, jax.tree_util.tree_leaves_with_path(abstract)):
        name = path[-1].key
        if name.endswith("_b"):
            out.append(jnp.zeros(a.shape, a.dtype))
            continue
        t = TARGETS[name[:-2]]
        fan_in = math.prod(a.shape[len(a.shape) - 1 - t.n_in:-1])
        bound = 1.0 / math.sqrt(fan_in)
        out.append(jax.random.uniform(k, a.shape, a.dtype, -bound, bound))
    return jax.tree.unflatten(treedef, out)


def scaled(adapters: Any, spec: LoraSpec) -> Any:
    """The inference form: B times alpha / rank (what the model reads under "lora")."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * spec.scale if p[-1].key.endswith("_b") else x, adapters)


def attach(base: Any, adapters: Any, spec: LoraSpec) -> Any:
    """Base parameters carrying the adapters (inference form) under "lora": what
    GPT.apply(gpt.variables(...)) adapts; differentiable in `adapters`."""
    return {**base, LORA: scaled(adapters, spec)}


def merge(params: Any) -> Any:
    """Parameters with the adapters they carry under "lora" folded into the kernels:
    W + A·B (B scaled), in W's dtype, computed in float32. Unchanged without adapters."""
    if LORA not in params:
        return params
    out = {k: v for k, v in params.items() if k != LORA}
    return _fold(out, params[LORA])


def _fold(base: Any, lora: Any) -> Any:
    out = dict(base)
    for key, node in lora.items():
        if key in TARGETS_BY_MODULE and any(k.endswith("_a") for k in node):
            mod = dict(base[key])
            for name in TARGETS_BY_MODULE[key]:
                if f"{name}_a" not in node:
                    continue
                t = TARGETS[name]
                w = mod[t.kernel]
                mod[t.kernel] = (w.astype(jnp.float32) + delta(
                    t, node[f"{name}_a"], node[f"{name}_b"], w.shape)).astype(w.dtype)
            out[key] = mod
        else:
            out[key] = _fold(base[key], node)
    return out


TARGETS_BY_MODULE: dict[str, tuple[str, ...]] = {
    m: tuple(n for n, t in TARGETS.items() if t.module == m) for m in ("attn", "mlp")}


def delta(t: Target, a: Any, b: Any, shape: tuple[int, ...]) -> jax.Array:
    """A·B as a kernel of `shape` (leading layer axes included), in float32."""
    lead, ins, outs = _split_shape(t, shape)
    r = a.shape[-1]
    a2 = jnp.asarray(a, jnp.float32).reshape(*lead, math.prod(ins), r)
    b2 = jnp.asarray(b, jnp.float32).reshape(*lead, r, math.prod(outs))
    return (a2 @ b2).reshape(shape)


def count(adapters: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


def _rank_axis(path: tuple[Any, ...], x: Any) -> int:
    """The rank axis of an adapter leaf: A's last; B's first after its leading axes."""
    name = path[-1].key
    if name.endswith("_a"):
        return x.ndim - 1
    t = TARGETS[name[:-2]]
    return x.ndim - (t.ndim - t.n_in) - 1


def pad_rank(adapters: Any, rank: int) -> Any:
    """Adapters widened to `rank` with zero columns of A and rows of B: the same update, so
    adapters of different ranks stack into one bank."""
    def pad(path: tuple[Any, ...], x: Any) -> Any:
        widths = [(0, 0)] * x.ndim
        axis = _rank_axis(path, x)
        widths[axis] = (0, rank - x.shape[axis])
        return jnp.pad(jnp.asarray(x), widths)

    return jax.tree_util.tree_map_with_path(pad, adapters)


def rank_of(adapters: Any) -> int:
    path, x = jax.tree_util.tree_leaves_with_path(adapters)[0]
    return x.shape[_rank_axis(path, x)]


def union_zeros(trees: list[Any]) -> list[Any]:
    """Each adapter tree completed with zero adapters for the targets only the others have, so
    that all share one structure (a zero adapter changes nothing)."""
    merged: dict[str, Any] = {}
    for tree in trees:
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            merged[jax.tree_util.keystr(path)] = (path, x)

    def complete(tree: Any) -> Any:
        out = jax.tree.map(lambda x: x, tree)
        for path, x in merged.values():
            node = out
            for k in path[:-1]:
                node = node.setdefault(k.key, {})
            node.setdefault(path[-1].key, np.zeros(x.shape, np.float32))
        return out

    return [complete(t) for t in trees]


def bank(trees: list[Any]) -> Any:
    """Adapter trees (inference form, one layout) stacked on a new leading axis behind an
    all-zero entry 0 (the base model): entry i + 1 is trees[i]. Ranks are padded to the
    largest and missing targets filled with zeros, so any row may pick any entry."""
    rank = max(rank_of(t) for t in trees)
    trees = union_zeros([pad_rank(t, rank) for t in trees])
    return jax.tree.map(lambda *xs: jnp.stack([jnp.zeros_like(xs[0]), *xs]), *trees)
