"""Pallas splash attention (TPU) for full-sequence causal attention: dense layers under a causal
mask, local layers under a band mask. Off TPU the same kernels run in Pallas interpret mode,
slowly, so tests can check them against the reference on a CPU.

Only for training and scoring (all T queries at once). Decoding keeps attention.cached_attention:
one query per step against a KV cache is a matrix-vector product that splash's [block_q, block_kv]
tiles would mostly pad, and its ring-buffered local cache is no mask splash knows.

Takes q, k, v as [B, T, H, K] like the other kernels in attention.py, and returns [B, T, H, K].
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

# A TPU vreg is 8 sublanes × 128 lanes: splash needs block_kv (and block_q, for masks it computes
# from positions) in multiples of 128, so T is padded up to one.
LANES = 128
# The largest tile: 512×512 is what MaxText's splash defaults to (sa_block_* = 512); bigger tiles
# amortize the per-grid-step overhead but must fit VMEM next to the [block, K] q/k/v/o tiles.
MAX_BLOCK = 512
# Pallas interpret mode: None runs it exactly when the program is not for a TPU (the active
# mesh's devices, else the backend: target_platform). Tests set False to export the
# real kernel with jax.export for platforms=["tpu"], which has no TPU mesh to follow.
INTERPRET: bool | None = None


def target_platform() -> str:
    """The platform the program being traced is for: that of the active mesh's devices (a mesh
    of a TPU slice's devices compiles for TPU on a CPU host, ahead of time), else the default
    backend. Kernels follow the target, not the host."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(T_pad: int, window: int | None) -> sa.BlockSizes:
    """Tiles for a (padded) length T_pad and a band (None: dense causal).

    Dense: the largest multiple-of-128 power of two up to 512 that divides T_pad, for queries and
    keys alike; splash skips the tiles above the diagonal. Local: queries keep that tile, but keys
    use a tile just wide enough for the band (rounded up to 128): a query tile of bq rows needs
    keys from bq + window - 1 positions, so a key tile much wider than the band would be mostly
    masked work that block sparsity cannot skip."""
    bq = LANES
    while bq * 2 <= MAX_BLOCK and T_pad % (bq * 2) == 0:
        bq *= 2
    bkv = bq
    if window is not None:
        bkv = LANES
        while bkv < window and bkv * 2 <= bq:
            bkv *= 2
    # The backward kernels (dq; dk and dv) walk the same tiles as the forward.
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)


def _kernel(H: int, T_pad: int, window: int | None, interpret: bool) -> sa.SplashAttentionKernel:
    """A kernel for H heads of [T_pad, K]. The band of a local layer is the token and the
    window - 1 before it: LocalMask's (left, right) = (window - 1, 0)."""
    shape = (T_pad, T_pad)
    if window is None:
        one = sa.CausalMask(shape)
    else:
        one = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    mask = sa.MultiHeadMask(tuple(one for _ in range(H)))
    # head_shards/q_seq_shards = 1: under a mesh each device builds the kernel for its own heads
    # (inside shard_map) and the sequence is never split.
    return sa.make_splash_mha(mask, block_sizes=block_sizes(T_pad, window), head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _attend(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array, window: int | None,
            interpret: bool) -> jax.Array:
    """Splash over one device's [B, H, T_pad, K] (shapes are per shard under shard_map)."""
    _, H, T_pad, _ = q_BHTK.shape
    kernel = _kernel(H, T_pad, window, interpret)
    return jax.vmap(kernel)(q_BHTK, k_BHTK, v_BHTK)  # the kernel takes no batch axis


def _mesh_spec(shape_BHTK: tuple[int, ...]) -> jax.sharding.PartitionSpec | None:
    """[B, H, T, K]'s mesh axes under the active mesh and logical-axis rules (batch over the data
    axes, heads over the tensor axis, as the model's q/k/v are constrained); None with no mesh.
    Resolved through the logical names, so this module knows no mesh axis names. A dimension its
    axes do not divide (a batch of 1 while parameters are initialized) stays whole: shard_map
    needs even shards, where the model's constraints let XLA pad."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = nn.logical_to_mesh_axes(("batch", "heads", "length", "kv"))
    dims = []
    for size, axes in zip(shape_BHTK, tuple(spec) + (None,) * (4 - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        dims.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return jax.sharding.PartitionSpec(*dims)


def splash_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array,
                     window: int | None, *, interpret: bool | None = None) -> jax.Array:
    """Causal (window None) or banded causal attention by splash; see the module docstring.

    interpret: Pallas interpret mode (None: INTERPRET, or else whenever the target is not a
    TPU)."""
    if interpret is None:
        interpret = INTERPRET if INTERPRET is not None else target_platform() != "tpu"
    B, T, H, K = q_BTHK.shape
    # Splash applies no 1/sqrt(K) itself: scale q first. The reference scales the fp32 logits
    # instead; scaling q in the compute dtype rounds once more in bf16 unless 1/sqrt(K) is a
    # power of two (K = 64, 256), and is the same in fp32 to rounding.
    q_BTHK = q_BTHK * jnp.asarray(1.0 / math.sqrt(K), q_BTHK.dtype)
    T_pad = _round_up(T, LANES)
    # Padding keys sit after every real query, so causality masks them; padded query rows are
    # dropped. The value head size is padded to a multiple of 128 lanes with zero columns
    # (sliced off after): jax 0.7's splash, our lowest supported jax, refuses other value head
    # sizes (jax-ml/jax#30861), though newer releases accept them; q and k need no padding
    # (any head size since jax-ml/jax#26676). Head sizes 64, 80 and 96 pay for it in v and
    # the output only.
    K_v = _round_up(K, LANES)

    def to_BHTK(x: jax.Array, k_pad: int = 0) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, T_pad - T), (0, 0), (0, k_pad)))
        return x.transpose(0, 2, 1, 3)

    q, k, v = to_BHTK(q_BTHK), to_BHTK(k_BTHK), to_BHTK(v_BTHK, K_v - K)
    attend = functools.partial(_attend, window=window, interpret=interpret)
    spec = _mesh_spec(q.shape)
    if spec is not None:
        # Each device runs splash on its own batch rows and heads; nothing is communicated.
        # check_vma off: pallas_call does not track which mesh axes its outputs vary over.
        attend = jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec,
                               check_vma=False)
    o_BHTK = attend(q, k, v)
    return o_BHTK.transpose(0, 2, 1, 3)[:, :T, :, :K]
