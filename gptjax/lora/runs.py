"""LoRA run directories: the adapters and their optimizer state, and a reference to the base.

A LoRA run's checkpoints hold only the adapters (its `params` item) and their Adam moments; its
meta holds `lora_base`: the base's path (train.init_from), the step read from it (a run
directory) and a checksum of the base as loaded. Whatever loads the run loads the base from
there and refuses a base whose checksum changed. `load_model` loads any run directory for
inference: an ordinary one's parameters, or a LoRA run's base carrying its adapters unmerged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax import checkpoint
from gptjax.config import Config, config_from_dict
from gptjax.errors import UserError
from gptjax.hf import gpt2
from gptjax.lora import adapters as lora_lib
from gptjax.model import param_shapes, stack_layers, unstack_layers
from gptjax.sharding import with_shardings
from gptjax.train import optim

BASE_KEY = "lora_base"  # in a LoRA run's meta


def is_lora(meta: dict[str, Any]) -> bool:
    return int(meta.get("config", {}).get("train", {}).get("lora_rank", 0) or 0) > 0


def base_checksum(base: Any) -> str:
    """One hex digest over every array's checksum (checkpoint.tree_checksums) and path: any
    changed bit of the base changes it, and sharding does not."""
    sums = checkpoint.tree_checksums(base)
    return hashlib.sha256(json.dumps(sorted(sums.items())).encode()).hexdigest()[:16]


def base_reference(source: str, step: int | None, base: Any) -> dict[str, Any]:
    path = source if "://" in source else str(Path(source).resolve())
    return {"path": path, "step": step, "checksum": base_checksum(base)}


def check_base(ref: dict[str, Any], base: Any, what: str) -> None:
    """UserError unless `base` is the base `ref` was recorded from."""
    now = base_checksum(base)
    if now != ref["checksum"]:
        raise UserError(f"{what}: the base {ref['path']} changed since the adapters were "
                        f"trained (checksum {ref['checksum']} then, {now} now)")


def load_weights(source: str, cfg: Config, abstract: Any, step: int | None = None
                 ) -> tuple[Any, int | None]:
    """(parameters, step read or None) of a run directory or a Hugging Face GPT-2 directory
    (train.init_from), restored straight into `abstract`'s shardings and dtypes. A LoRA run
    directory gives its base with its adapters merged."""
    what = f"train.init_from={source}"
    if gpt2.is_hf_dir(source):
        return gpt2.init_params_for(source, cfg.model, abstract), None
    step, meta = checkpoint.read_meta(source, step)
    if is_lora(meta):
        params, _, _, step = load_model(source, step)
        params = lora_lib.merge(params)
        checkpoint.check_param_shapes(params, abstract, what)
        return _place(params, abstract), step
    their_model = config_from_dict(meta["config"]).model
    # The same weights in the other layout (scanned stacks vs unrolled layers_i) convert.
    relayout = their_model.scan_layers != cfg.model.scan_layers
    as_mine = dataclasses.replace(their_model, scan_layers=cfg.model.scan_layers)
    theirs = param_shapes(as_mine)
    checkpoint.check_param_shapes(theirs, abstract, what)
    if relayout:  # read onto one device in their layout, then restack and place
        params = checkpoint.load_params(source, step)[0]
        params = (unstack_layers(params, their_model) if their_model.scan_layers
                  else stack_layers(params, their_model))
        return _place(params, abstract), step
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    params = checkpoint.load_params(source, step, shardings=shardings)[0]
    return _place(params, abstract), step


def one_device(tree: Any) -> Any:
    """The default device's sharding for every leaf of `tree`."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: dev, tree)


def _place(params: Any, abstract: Any) -> Any:
    """In abstract's dtypes (a base kept in bfloat16) and shardings."""
    return jax.tree.map(
        lambda x, a: jax.device_put(x.astype(a.dtype), getattr(a, "sharding", None)),
        params, abstract)


def read_adapters(run_dir: str | Path, step: int | None = None, shardings: Any = None
                  ) -> tuple[Any, Config, dict[str, Any], int]:
    """(adapters as trained, config, meta, step) of a LoRA run, without its base. shardings:
    the base's parameter shardings, which the adapters follow (default: one device)."""
    step, meta = checkpoint.read_meta(run_dir, step)
    if not is_lora(meta):
        raise UserError(f"{run_dir} is not a LoRA run (train.lora_rank is 0 there)")
    cfg = config_from_dict(meta["config"])
    spec = lora_lib.LoraSpec.of(cfg.train)
    base_abs = param_shapes(cfg.model)
    abstract = lora_lib.shapes(base_abs, spec)
    if shardings is not None:
        abstract = with_shardings(abstract, lora_lib.shardings(shardings, base_abs, spec))
    ad = checkpoint.load_params(run_dir, step, abstract=abstract)[0]
    return ad, cfg, meta, step


def load_base(cfg: Config, meta: dict[str, Any], shardings: Any = None) -> Any:
    """The base a LoRA run refers to, checked against its checksum."""
    ref = meta[BASE_KEY]
    abstract = param_shapes(cfg.model)
    abstract = with_shardings(abstract, shardings if shardings is not None else one_device(
        abstract))
    try:
        base, _ = load_weights(ref["path"], cfg, abstract, ref["step"])
    except UserError as e:
        raise UserError(f"the LoRA run's base: {e}") from None
    check_base(ref, base, "LoRA run")
    return base


def load_model(run_dir: str | Path, step: int | None = None, shardings: Any = None
               ) -> tuple[Any, Config, dict[str, Any], int]:
    """(params, config, meta, step) of any run directory for inference: checkpoint.load_params
    for an ordinary run; for a LoRA run its base (from its path, checked by checksum) carrying
    the adapters under "lora", unmerged (model.variables). shardings: the base's."""
    step_, meta = checkpoint.read_meta(run_dir, step)
    if not is_lora(meta):
        return checkpoint.load_params(run_dir, step, shardings)
    ad, cfg, meta, step_ = read_adapters(run_dir, step_, shardings)
    base = load_base(cfg, meta, shardings)
    return lora_lib.attach(base, ad, lora_lib.LoraSpec.of(cfg.train)), cfg, meta, step_


def write_run(out: str | Path, cfg: Config, params: Any, step: int,
              extra: dict[str, Any]) -> None:
    """A complete run directory at `step` holding `params` (the adapters of a LoRA config),
    zero Adam moments of cfg's optimizer and a data position at the start."""
    out = Path(out)
    if checkpoint.checkpoint_dir(out).is_dir() and any(checkpoint.checkpoint_dir(out).iterdir()):
        raise UserError(f"{out} already holds checkpoints; choose another --out")
    params = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), params)
    opt_state = optim.make_optimizer(cfg.optim).init(params)
    data_state = {"seed": cfg.data.seed, "epoch": 0, "index": 0}
    meta = checkpoint.make_meta(cfg, step, {"tokens": 0, **extra})
    ckpt = checkpoint.Checkpointer(out, async_save=False)
    try:
        ckpt.save(step, params, opt_state, data_state, meta)
    finally:
        ckpt.close()
