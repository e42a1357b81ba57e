"""LoRA adapters in Hugging Face PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`): the mapping, as gpt2.py maps the weights.

PEFT wraps GPT-2's Conv1D modules (weights [in, out], `fan_in_fan_out=True`) and stores, per
adapted module, lora_A.weight [r, in] and lora_B.weight [out, r], with the update
(lora_alpha / r)·x·Aᵀ·Bᵀ. Ours are A [in..., r] and B [r, out...] in the base kernel's axes, so
the mapping is a reshape and a transpose:

    h.i.attn.c_attn  qkv   a [D, r] = lora_Aᵀ      b [r, 3, H, K] = lora_Bᵀ reshaped
    h.i.attn.c_proj  out   a [H, K, r]             b [r, D]
    h.i.mlp.c_fc     fc    a [D, r]                b [r, F]
    h.i.mlp.c_proj   proj  a [F, r]                b [r, D]

Target modules are written with their parent (`attn.c_proj`, `mlp.c_proj`), so PEFT does not
confuse the two c_proj; on import, target_modules match as PEFT matches them (a bare "c_proj"
is both). Every target of ours has a module there; what PEFT can express and we
cannot (DoRA, trained biases, extra trained modules, per-layer ranks, ...) is refused on import.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.hf.gpt2 import check_exportable, write_safetensors
from gptjax.lora.adapters import TARGETS, LoraSpec, shapes
from gptjax.model import param_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODULES = {"qkv": "attn.c_attn", "out": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}
PREFIX = "base_model.model.transformer.h."
# adapter_config.json keys whose non-default values change what the adapter computes in a way
# ours cannot (DoRA, activated LoRA, extra trained modules, per-layer ranks, ...): key -> the
# values that mean "off"
UNSUPPORTED = {"use_dora": (False, None), "modules_to_save": (None, []),
               "layers_to_transform": (None, []), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "layer_replication": (None,),
               "trainable_token_indices": (None,), "lora_bias": (False, None),
               "target_parameters": (None, []), "alora_invocation_tokens": (None,),
               "use_qalora": (False, None), "use_bdlora": (None, False),
               "kasa_config": (None,), "monteclora_config": (None,), "arrow_config": (None,)}
# init_lora_weights that also rewrite the base's weights: the adapter then belongs to a changed
# base, not to the one given
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _layer(tree: Any, cfg: ModelConfig, i: int) -> tuple[Any, int | None]:
    """(the block dict of layer i, its index on the stacked axis or None when unrolled)."""
    P = cfg.period
    if cfg.scan_layers:
        return tree["layers"][f"block{i % P}"], i // P
    return tree[f"layers_{i // P}"][f"block{i % P}"], None


def to_peft(adapters: Any, spec: LoraSpec, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors (float32) of our trained adapters."""
    check_exportable(cfg)
    out = {}
    for i in range(cfg.n_layer):
        block, at = _layer(adapters, cfg, i)
        for name in spec.targets:
            t = TARGETS[name]
            a, b = (np.asarray(block[t.module][f"{name}_{x}"], np.float32) for x in "ab")
            if at is not None:
                a, b = a[at], b[at]
            key = f"{PREFIX}{i}.{MODULES[name]}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
    return out


def from_peft(tensors: dict[str, np.ndarray], spec: LoraSpec, cfg: ModelConfig,
              where: str) -> Any:
    """Our adapters (numpy float32, cfg's layout) of PEFT's tensors; a missing, unexpected or
    misshapen tensor is a UserError."""
    want = shapes(param_shapes(cfg), spec)
    layers = []
    for i in range(cfg.n_layer):
        blk: dict[str, dict[str, np.ndarray]] = {}
        for name in spec.targets:
            t = TARGETS[name]
            block, at = _layer(want, cfg, i)
            lead = 0 if at is None else 1  # the stacked layer axis
            shape_a = block[t.module][f"{name}_a"].shape[lead:]
            shape_b = block[t.module][f"{name}_b"].shape[lead:]
            key = f"{PREFIX}{i}.{MODULES[name]}"
            a, b = _take(tensors, f"{key}.lora_A.weight", where), _take(
                tensors, f"{key}.lora_B.weight", where)
            n_in, n_out = math.prod(shape_a[:-1]), math.prod(shape_b[1:])
            if a.shape != (spec.rank, n_in) or b.shape != (n_out, spec.rank):
                raise UserError(f"{where}: {key} has lora_A {a.shape} and lora_B {b.shape}, "
                                f"but the base implies {(spec.rank, n_in)} and "
                                f"{(n_out, spec.rank)}")
            blk.setdefault(t.module, {})[f"{name}_a"] = a.T.reshape(shape_a)
            blk[t.module][f"{name}_b"] = b.T.reshape(shape_b)
        layers.append(blk)
    if tensors:
        raise UserError(f"{where}: unexpected tensor {sorted(tensors)[0]!r} (not one of "
                        f"{', '.join(MODULES[n] for n in spec.targets)} of a GPT-2 layer)")
    P = cfg.period
    if cfg.scan_layers:
        return {"layers": {f"block{j}": _stack(layers[j::P]) for j in range(P)}}
    return {f"layers_{p}": {f"block{j}": layers[p * P + j] for j in range(P)}
            for p in range(cfg.n_layer // P)}


def _take(tensors: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    if key not in tensors:
        raise UserError(f"{where}: tensor {key} is missing")
    return np.asarray(tensors.pop(key), np.float32)


def _stack(trees: list[Any]) -> Any:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def adapter_config(spec: LoraSpec, base: str) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": [MODULES[n] for n in spec.targets], "fan_in_fan_out": True,
            "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base}


def spec_of(conf: dict[str, Any], n_layer: int, where: str) -> LoraSpec:
    """Our LoraSpec of a PEFT adapter config for a GPT-2 of `n_layer` layers, or a UserError
    naming what we cannot hold."""
    if conf.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type {conf.get('peft_type')!r}; only LORA adapters load")
    for key, defaults in UNSUPPORTED.items():
        if conf.get(key) not in defaults:
            raise UserError(f"{where}: {key}={conf[key]!r} is not supported (gptjax's adapters "
                            "are plain LoRA on GPT-2's projections)")
    init = conf.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UserError(f"{where}: init_lora_weights={init!r} changes the base's weights too; "
                        "convert the adapter to a plain LoRA with PEFT first")
    if conf.get("bias", "none") != "none":
        raise UserError(f"{where}: bias={conf['bias']!r}: trained biases are not supported")
    if not conf.get("fan_in_fan_out", True):
        raise UserError(f"{where}: fan_in_fan_out=false; GPT-2's Conv1D adapters need true")
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    if (not isinstance(r, int) or isinstance(r, bool) or r < 1
            or not isinstance(alpha, (int, float)) or isinstance(alpha, bool)):
        raise UserError(f"{where}: r={r!r}, lora_alpha={alpha!r}: need a positive integer r "
                        "and a numeric lora_alpha")
    alpha = float(alpha)
    if conf.get("use_rslora"):  # PEFT scales by alpha / sqrt(r), ours by alpha / r: same scale
        alpha *= math.sqrt(r)
    targets = _targets(conf.get("target_modules"), n_layer, where)
    return LoraSpec(r, alpha, targets, float(conf.get("lora_dropout") or 0.0))


def _targets(modules: Any, n_layer: int, where: str) -> tuple[str, ...]:
    """Our targets of PEFT's target_modules, matched as PEFT matches them against the model's
    module names: a list entry by name or dotted suffix ("c_proj" is both c_proj), a string as a
    regular expression of the whole name. Each must adapt its modules in every layer."""
    names = {n: [f"transformer.h.{i}.{m}" for i in range(n_layer)] for n, m in MODULES.items()}
    if modules == "all-linear":  # PEFT: every linear layer but the output head
        return tuple(MODULES)
    if isinstance(modules, str):
        try:
            hits = {n: [re.fullmatch(modules, k) is not None for k in ks]
                    for n, ks in names.items()}
        except re.error as e:
            raise UserError(f"{where}: target_modules {modules!r} is not a regular expression "
                            f"({e})") from None
        matched = _whole_layers(hits, modules, where)
        if not matched:
            raise UserError(f"{where}: target_modules {modules!r} matches none of GPT-2's "
                            f"{', '.join(MODULES.values())}")
        return matched
    if not isinstance(modules, list) or not modules:
        raise UserError(f"{where}: target_modules={modules!r}: expected a list of module names")
    found: set[str] = set()
    for m in modules:
        hits = {n: [k == m or k.endswith(f".{m}") for k in ks] for n, ks in names.items()}
        here = _whole_layers(hits, m, where)
        if not here:
            raise UserError(f"{where}: target module {m!r} has no gptjax counterpart (the "
                            f"adaptable ones: {', '.join(MODULES.values())})")
        found.update(here)
    return tuple(n for n in MODULES if n in found)


def _whole_layers(hits: dict[str, list[bool]], pattern: str, where: str) -> tuple[str, ...]:
    """The targets whose module `pattern` matches in every layer; in only some is refused."""
    for n, h in hits.items():
        if any(h) and not all(h):
            raise UserError(f"{where}: target module {pattern!r} adapts {MODULES[n]} in only "
                            f"some layers; gptjax's adapters span every layer")
    return tuple(n for n, h in hits.items() if all(h))


def read(peft_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, tensors) of a PEFT directory."""
    d = Path(peft_dir)
    try:
        conf = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{d / CONFIG_FILE}: not readable JSON "
                        f"({str(e).splitlines()[0][:200]})") from None
    if not isinstance(conf, dict):
        raise UserError(f"{d / CONFIG_FILE}: not a JSON object")
    try:
        from safetensors import SafetensorError  # optional: the hf extra
        from safetensors.numpy import load_file
    except ImportError:
        raise UserError("reading safetensors needs the `safetensors` package: "
                        "pip install -e '.[hf]'") from None

    if not (d / WEIGHTS_FILE).is_file():
        raise UserError(f"{d} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{d / WEIGHTS_FILE}: not a readable safetensors file "
                        f"({str(e).splitlines()[0][:200]})") from None
    return conf, tensors


def write(adapters: Any, spec: LoraSpec, cfg: ModelConfig, out: str | Path, base: str,
          force: bool = False) -> Path:
    """Writes a PEFT directory that `PeftModel.from_pretrained(GPT2LMHeadModel, out)` loads."""
    try:
        from safetensors.numpy import save_file  # optional: the hf extra
    except ImportError:
        raise UserError("writing safetensors needs the `safetensors` package: "
                        "pip install -e '.[hf]'") from None

    out = Path(out)
    tensors = to_peft(adapters, spec, cfg)
    if not force and any((out / n).exists() for n in (CONFIG_FILE, WEIGHTS_FILE)):
        raise UserError(f"{out} already holds an adapter; pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(save_file, tensors, out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(adapter_config(spec, base), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out
