"""`python -m gptjax.serve --dry-run --topology SLICE`: the serving engine's programs compiled by
XLA:TPU for a slice, on this host, with XLA's memory per chip.

Compiles exactly what the engine runs (`engine.programs`, the engine's shardings): one prefill
bucket and the decode call at the widest attention bucket (the whole context), for --max-batch
slots of the full context, with no weights allocated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax import checkpoint, model, sharding
from gptjax.aot import memory, topology
from gptjax.aot.topology import Slice
from gptjax.config import MeshConfig, ModelConfig, config_from_dict, load_config
from gptjax.decode.generate import PROMPT_BUCKET, decode_config
from gptjax.errors import UserError
from gptjax.serve.engine import placement, programs

GIB = memory.GIB


def abstract_inputs(cfg: ModelConfig, mesh: Mesh, max_batch: int) -> tuple[Any, Any, Any]:
    """(parameters, slot cache, slot state) as the engine holds them, as shapes with their
    shardings: the weights cast to the compute dtype and unrolled, the cache of every slot."""
    dcfg = decode_config(cfg)
    p_sh, c_sh = placement(dcfg, mesh, max_batch, cfg.context_length)
    params = jax.eval_shape(lambda k: model.unstack_layers(
        model.cast_to_compute_dtype(model.init_params(cfg, k), cfg), cfg), jax.random.key(0))
    cache = jax.eval_shape(lambda: model.init_cache(dcfg, max_batch, cfg.context_length))
    rep = sharding.replicated(mesh)
    S = max_batch
    state = {k: jax.ShapeDtypeStruct(shape, dt, sharding=rep) for k, shape, dt in (
        ("last", (S,), np.int32), ("active", (S,), np.bool_), ("left", (S,), np.int32),
        ("count", (S,), np.int32), ("temperature", (S,), np.float32),
        ("top_k", (S,), np.int32), ("top_p", (S,), np.float32), ("keys", (S, 2), np.uint32),
        ("adapter", (S,), np.int32))}
    return (sharding.with_shardings(params, p_sh), sharding.with_shardings(cache, c_sh), state)


def dry_run(cfg: ModelConfig, mesh: Mesh, target: Slice, *, max_batch: int,
            steps_per_call: int, prompt_len: int = PROMPT_BUCKET) -> tuple[str, dict[str, Any]]:
    """(report, record) of the prefill of one prompt bucket and the decode call, compiled for
    the slice whose devices `mesh` holds."""
    sharding.check_batch(max_batch, mesh, "--max-batch")
    dcfg = decode_config(cfg)
    prefill, decode = programs(dcfg, cfg.context_length, 0)
    params, cache, state = abstract_inputs(cfg, mesh, max_batch)
    T = min(-(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET, cfg.context_length)
    rep = sharding.replicated(mesh)
    row = jax.ShapeDtypeStruct((1, T), np.int32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
    with sharding.activate(mesh):
        pre, pre_s = memory.timed_compile(lambda: prefill.lower(
            params, None, cache, row, row, scalar, scalar, scalar, with_logprobs=True).compile(),
            aot=True)
        dec, dec_s = memory.timed_compile(lambda: decode.lower(
            params, None, cache, state, steps=steps_per_call,
            attend_len=cfg.context_length).compile(), aot=True)
    weights, kv = memory.bytes_per_device(params), memory.bytes_per_device(cache)
    hbm = target.hbm_gib
    lines = [
        f"serving {model.count_params(cfg):,} parameters on {target.topology} "
        f"({mesh.devices.size} {target.chip} chips, mesh {dict(mesh.shape)}), compiled by "
        f"XLA:TPU on this host",
        f"per chip: weights {weights / GIB:.2f} GiB ({jnp.dtype(cfg.dtype).name}), KV cache "
        f"{kv / GIB:.2f} GiB ({max_batch} slots x {cfg.context_length} positions)",
    ]
    record: dict[str, Any] = {"weights_gib": weights / GIB, "kv_cache_gib": kv / GIB,
                              "compile_s": {"prefill": pre_s, "decode": dec_s}}
    needs = []
    for name, compiled, secs, what in (
            ("prefill", pre, pre_s, f"one prompt of {T} tokens"),
            ("decode", dec, dec_s, f"{steps_per_call} steps of every slot")):
        mem = memory.analyse(compiled)
        if mem is None:
            continue
        needs.append(mem.need / GIB)
        record[name] = mem.as_dict()
        lines.append(f"{name} ({what}; compiled in {secs:.1f} s): {mem.text()}")
    need = max(needs) if needs else None
    record.update(need_gib=need, fits=need is not None and need <= hbm)
    lines.append(f"per chip ({target.chip}, {hbm:g} GiB HBM): "
                 f"{memory.fits_text(need, hbm)}")
    return "\n".join(lines), record


def main(a: Any) -> int:
    """The CLI's --dry-run --topology: the config from --config or the run's own, the mesh from
    --mesh (default: tensor parallel over the slice)."""
    topology.parse(a.topology)  # a bad name is one line before a run is read
    cfg = (load_config(a.config, []) if a.config is not None
           else config_from_dict(checkpoint.read_meta(a.checkpoint, a.step)[1]["config"]))
    mesh_cfg = a.mesh or MeshConfig(data=1, fsdp=1, tensor=-1)
    target, mesh = topology.for_slice(mesh_cfg, a.topology)
    if cfg.model.n_head % mesh.shape["tensor"]:
        raise UserError(f"--mesh: tensor {mesh.shape['tensor']} does not divide the model's "
                        f"{cfg.model.n_head} heads; give --mesh DATA,FSDP,TENSOR for the "
                        f"{target.n_chips} chips")
    text, _ = dry_run(cfg.model, mesh, target, max_batch=a.max_batch,
                      steps_per_call=a.steps_per_call)
    print(text, flush=True)
    return 0
