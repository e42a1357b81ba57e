"""GPT-2 weights in the Hugging Face format (`config.json` + `model.safetensors`): the mapping.

GPT-2's block is ours with dense attention in every layer (pre-LayerNorm, tanh GELU, learned
positions, tied embeddings), so the conversion is a renaming plus reshapes:

    wte.weight [V, D]                 wte [Vpad, D] (rows past V are zeros; dropped on export)
    wpe.weight [P, D]                 wpe [P, D]
    h.i.ln_1 / ln_2 .weight, .bias    layers/block0/ln1 / ln2 .scale, .bias [i]
    h.i.attn.c_attn.weight [D, 3D]    .../attn/qkv_kernel [i, D, 3, H, K]
    h.i.attn.c_attn.bias [3D]         .../attn/qkv_bias [i, 3, H, K]
    h.i.attn.c_proj.weight [D, D]     .../attn/out_kernel [i, H, K, D]
    h.i.mlp.c_fc / c_proj             .../mlp/fc_kernel [i, D, F], proj_kernel [i, F, D] (+ biases)
    ln_f.weight, .bias                ln_f/scale, bias

Hugging Face's Conv1D stores weights [in, out] and computes x @ W, as our einsums do, so nothing
is transposed. Reading needs only `safetensors`; transformers and torch are for the tests. Run directories from
and to this format: convert.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax import checkpoint
from gptjax.config import ModelConfig, config_from_dict
from gptjax.errors import UserError
from gptjax.tokenizer import TOKENIZER_CLASSES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints (large models)
# Activations that are GPT-2's tanh approximation of GELU (the one our Mlp computes).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Causal-mask buffers that older transformers versions saved next to the weights.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
OTHER_WEIGHT_FILES = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
# GPT2Config's defaults, used where a config.json leaves a key out (as transformers does).
HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
               "n_head": 12, "n_inner": None, "layer_norm_epsilon": 1e-5,
               "initializer_range": 0.02, "activation_function": "gelu_new"}


# --------------------------------------------------------------------------- config


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json), as opposed to a gptjax run (checkpoints/)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and not (p / "checkpoints").is_dir()


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a GPT-2 directory; another architecture is a UserError."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such directory")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{d} has no {CONFIG_FILE}: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a JSON object")
    kind = raw.get("model_type")
    if kind != "gpt2":
        arch = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise UserError(f"{path}: model_type is {kind!r} ({arch}), not 'gpt2'; "
                        "only GPT-2 checkpoints can be imported")
    return {**HF_DEFAULTS, **raw}


def model_config_from_hf(hf: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json (dense attention in every layer)."""
    unsupported = [
        (hf["activation_function"] not in TANH_GELUS,
         f"activation_function={hf['activation_function']!r} (only {', '.join(TANH_GELUS)})"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (bool(hf.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx=true"),
        (bool(hf.get("add_cross_attention")), "add_cross_attention=true"),
        (hf.get("tie_word_embeddings", True) is False, "tie_word_embeddings=false"),
    ]
    for bad, what in unsupported:
        if bad:
            raise UserError(f"{where}: {what} is not GPT-2's architecture as gptjax builds it")
    d_model = hf["n_embd"]
    model = {
        "vocab_size": hf["vocab_size"],
        "context_length": hf["n_positions"],
        "n_layer": hf["n_layer"],
        "d_model": d_model,
        "n_head": hf["n_head"],
        "d_ff": hf["n_inner"] if hf["n_inner"] is not None else 4 * d_model,
        "attention_pattern": ["dense"],
        "layer_norm_eps": hf["layer_norm_epsilon"],
        "init_std": hf["initializer_range"],
    }
    try:
        return config_from_dict({"model": model}).model
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def hf_config_from_model(cfg: ModelConfig, tokenizer: str | None = None) -> dict[str, Any]:
    """A GPT-2 config.json for `cfg` (which must be dense in every layer)."""
    check_exportable(cfg)
    out: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
    }
    eot = TOKENIZER_CLASSES[tokenizer].eot_id if tokenizer in TOKENIZER_CLASSES else None
    if eot is not None and eot < cfg.vocab_size:
        out["bos_token_id"] = out["eos_token_id"] = eot
    return out


def check_exportable(cfg: ModelConfig) -> None:
    if any(kind != "dense" for kind in cfg.attention_pattern):
        raise UserError(
            f"model.attention_pattern={','.join(cfg.attention_pattern)} has banded (local) layers, "
            "which GPT-2 does not have; only models with dense attention in every layer export"
        )


def default_tokenizer(vocab_size: int) -> str:
    """GPT-2's BPE when its 50257 ids fit, else bytes (a model of fewer ids has no tokenizer of
    ours; the recorded name then only matters to sample.py and data loading)."""
    return "gpt2" if vocab_size >= 50257 else "byte"


# --------------------------------------------------------------------------- tensors


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names (without the `transformer.` prefix) and shapes for `cfg`."""
    V, P, D, F = cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.d_ff
    out = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        out.update({
            h + "ln_1.weight": (D,), h + "ln_1.bias": (D,),
            h + "attn.c_attn.weight": (D, 3 * D), h + "attn.c_attn.bias": (3 * D,),
            h + "attn.c_proj.weight": (D, D), h + "attn.c_proj.bias": (D,),
            h + "ln_2.weight": (D,), h + "ln_2.bias": (D,),
            h + "mlp.c_fc.weight": (D, F), h + "mlp.c_fc.bias": (F,),
            h + "mlp.c_proj.weight": (F, D), h + "mlp.c_proj.bias": (D,),
        })
    return out


def _weight_files(d: Path) -> list[Path]:
    if (d / WEIGHTS_FILE).is_file():
        return [d / WEIGHTS_FILE]
    if (d / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{d / INDEX_FILE}: not a safetensors index") from None
        files = [d / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"{d}: {f.name}, listed in {INDEX_FILE}, is missing")
        return files
    others = [n for n in OTHER_WEIGHT_FILES if (d / n).exists()]
    hint = (f" (it has {', '.join(others)}; re-save it with transformers' "
            "save_pretrained(..., safe_serialization=True))") if others else ""
    raise UserError(f"{d} has no {WEIGHTS_FILE}{hint}")


def read_hf_tensors(hf_dir: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Every GPT-2 tensor of a directory as float32 numpy, names without `transformer.`, checked
    against the shapes `cfg` implies (missing, unexpected or misshapen tensors: UserError)."""
    d = Path(hf_dir)
    files = _weight_files(d)
    try:
        from safetensors import SafetensorError, safe_open  # optional: the hf extra
    except ImportError:
        raise UserError("reading safetensors needs the `safetensors` package: "
                        "pip install -e '.[hf]'") from None
    want = expected_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    lm_head = None
    # The "flax" framework reads bfloat16 too (numpy has no such dtype); on the CPU, so a large
    # checkpoint never lands in accelerator memory on the way.
    with jax.default_device(jax.devices("cpu")[0]):
        for path in files:
            try:
                with safe_open(str(path), framework="flax") as f:
                    for key in f.keys():
                        name = key.removeprefix("transformer.")
                        if name.endswith(BUFFER_SUFFIXES):
                            continue
                        if name == "lm_head.weight":
                            lm_head = np.asarray(f.get_tensor(key), np.float32)
                            continue
                        if name not in want:
                            raise UserError(f"{path}: unexpected tensor {key!r} for a GPT-2 of "
                                            f"{cfg.n_layer} layers (not a GPT2LMHeadModel?)")
                        tensors[name] = np.asarray(f.get_tensor(key), np.float32)
            except (SafetensorError, OSError) as e:
                raise UserError(f"{path}: not a readable safetensors file "
                                f"({str(e).splitlines()[0][:200]})") from None
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{d}: tensor {name} is missing from {files[0].name}")
        if tensors[name].shape != shape:
            raise UserError(f"{d}: tensor {name} has shape {tensors[name].shape} but "
                            f"{CONFIG_FILE} implies {shape}")
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise UserError(f"{d}: lm_head.weight differs from wte.weight; gptjax ties them")
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Our parameter tree (numpy, cfg.param_dtype) in cfg's layout: scanned or not, and any
    period of the attention pattern (layer i is block i % period of period i // period)."""
    D, H, K = cfg.d_model, cfg.n_head, cfg.head_dim
    dt = np.dtype(_np_dtype(cfg.param_dtype))

    def layer(i: int) -> dict[str, Any]:
        t = lambda name: tensors[f"h.{i}.{name}"]  # noqa: E731
        return {
            "ln1": {"scale": t("ln_1.weight"), "bias": t("ln_1.bias")},
            "attn": {
                "qkv_kernel": t("attn.c_attn.weight").reshape(D, 3, H, K),
                "qkv_bias": t("attn.c_attn.bias").reshape(3, H, K),
                "out_kernel": t("attn.c_proj.weight").reshape(H, K, D),
                "out_bias": t("attn.c_proj.bias"),
            },
            "ln2": {"scale": t("ln_2.weight"), "bias": t("ln_2.bias")},
            "mlp": {
                "fc_kernel": t("mlp.c_fc.weight"), "fc_bias": t("mlp.c_fc.bias"),
                "proj_kernel": t("mlp.c_proj.weight"), "proj_bias": t("mlp.c_proj.bias"),
            },
        }

    wte = np.zeros((cfg.padded_vocab_size, D), np.float32)
    wte[: cfg.vocab_size] = tensors["wte.weight"]
    params: dict[str, Any] = {
        "wte": wte,
        "wpe": tensors["wpe.weight"],
        "ln_f": {"scale": tensors["ln_f.weight"], "bias": tensors["ln_f.bias"]},
    }
    layers = [layer(i) for i in range(cfg.n_layer)]
    P = cfg.period
    if cfg.scan_layers:
        params["layers"] = {f"block{j}": _stack(layers[j::P]) for j in range(P)}
    else:
        for p in range(cfg.n_layer // P):
            params[f"layers_{p}"] = {f"block{j}": layers[p * P + j] for j in range(P)}
    return _tree_map(lambda a: np.ascontiguousarray(a, dtype=dt), params)


def params_to_hf(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face GPT2LMHeadModel tensors (float32, `transformer.` names, no lm_head: it is
    tied) from our parameters in either layout."""
    check_exportable(cfg)
    D, F = cfg.d_model, cfg.d_ff
    P = cfg.period
    params = _tree_map(lambda a: np.asarray(a, np.float32), params)

    def layer(i: int) -> dict[str, Any]:
        if cfg.scan_layers:
            return _tree_map(lambda a: a[i // P], params["layers"][f"block{i % P}"])
        return params[f"layers_{i // P}"][f"block{i % P}"]

    out = {
        "wte.weight": params["wte"][: cfg.vocab_size],
        "wpe.weight": params["wpe"],
        "ln_f.weight": params["ln_f"]["scale"],
        "ln_f.bias": params["ln_f"]["bias"],
    }
    for i in range(cfg.n_layer):
        b, h = layer(i), f"h.{i}."
        out.update({
            h + "ln_1.weight": b["ln1"]["scale"], h + "ln_1.bias": b["ln1"]["bias"],
            h + "attn.c_attn.weight": b["attn"]["qkv_kernel"].reshape(D, 3 * D),
            h + "attn.c_attn.bias": b["attn"]["qkv_bias"].reshape(3 * D),
            h + "attn.c_proj.weight": b["attn"]["out_kernel"].reshape(D, D),
            h + "attn.c_proj.bias": b["attn"]["out_bias"],
            h + "ln_2.weight": b["ln2"]["scale"], h + "ln_2.bias": b["ln2"]["bias"],
            h + "mlp.c_fc.weight": b["mlp"]["fc_kernel"].reshape(D, F),
            h + "mlp.c_fc.bias": b["mlp"]["fc_bias"],
            h + "mlp.c_proj.weight": b["mlp"]["proj_kernel"].reshape(F, D),
            h + "mlp.c_proj.bias": b["mlp"]["proj_bias"],
        })
    return {f"transformer.{k}": np.ascontiguousarray(v) for k, v in out.items()}


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes  # comes with jax; only bf16 exports need it

        return ml_dtypes.bfloat16
    return name


def _stack(trees: list[Any]) -> Any:
    return _tree_map(lambda *xs: np.stack(xs), *trees)


def _tree_map(fn: Any, *trees: Any) -> Any:
    if isinstance(trees[0], dict):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


# --------------------------------------------------------------------------- public entry points


def load_gpt2(hf_dir: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """(numpy parameters, ModelConfig) of a Hugging Face GPT-2 directory.

    Raises:
        UserError: missing files, another architecture, or tensors that do not match the config.
    """
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf, str(Path(hf_dir) / CONFIG_FILE))
    return params_from_hf(read_hf_tensors(hf_dir, cfg), cfg), cfg


def save_gpt2(params: Any, cfg: ModelConfig, out_dir: str | Path, tokenizer: str | None = None,
              force: bool = False) -> Path:
    """Writes `config.json` + `model.safetensors`, loadable by `GPT2LMHeadModel.from_pretrained`.

    Raises:
        UserError: a model with local attention layers, or `out_dir` already holding a model
            (unless force).
    """
    out = Path(out_dir)
    hf = hf_config_from_model(cfg, tokenizer)
    tensors = params_to_hf(params, cfg)
    if not force and any((out / n).exists() for n in (CONFIG_FILE, WEIGHTS_FILE)):
        raise UserError(f"{out} already holds a model; pass --force to overwrite it")
    try:
        from safetensors.numpy import save_file  # optional: the hf extra
    except ImportError:
        raise UserError("writing safetensors needs the `safetensors` package: "
                        "pip install -e '.[hf]'") from None
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(save_file, tensors, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    return out


def write_safetensors(save_file: Any, tensors: dict[str, np.ndarray], path: Path) -> None:
    """Written beside and renamed, so a crash never leaves a truncated file; readable as any
    file the user makes (safetensors creates 0600)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def init_params_for(hf_dir: str | Path, cfg: ModelConfig, abstract_params: Any,
                    what: str = "train.init_from") -> Any:
    """A GPT-2 directory's parameters in `cfg`'s layout, placed as `abstract_params` (a tree of
    ShapeDtypeStructs with shardings) says: `train.init_from=HF_DIR`.

    Raises:
        UserError: when the checkpoint's shapes differ from cfg's (one line naming the field).
    """
    theirs = model_config_from_hf(read_hf_config(hf_dir), str(Path(hf_dir) / CONFIG_FILE))
    if any(kind != "dense" for kind in cfg.attention_pattern):
        raise UserError(f"{what}={hf_dir} is a GPT-2 (dense attention in every layer) but "
                        f"model.attention_pattern={','.join(cfg.attention_pattern)}; "
                        "set model.attention_pattern=dense")
    for field in ModelConfig.SHAPE_FIELDS:
        a, b = getattr(theirs, field), getattr(cfg, field)
        if a != b:
            raise UserError(f"{what}={hf_dir}: model.{field} is {a} there but {b} in this config")
    # Only the layout comes from cfg: padding, scanning and dtype are ours to choose.
    target = dataclasses.replace(theirs, vocab_multiple=cfg.vocab_multiple,
                                 scan_layers=cfg.scan_layers, param_dtype=cfg.param_dtype)
    params = params_from_hf(read_hf_tensors(hf_dir, theirs), target)
    checkpoint.check_param_shapes(params, abstract_params, f"{what}={hf_dir}")

    def place(a: jax.ShapeDtypeStruct, x: np.ndarray) -> jax.Array:
        x = x.astype(a.dtype)
        # From a callback, so each process builds only its own shards (multi-host safe).
        return jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx])

    return jax.tree.map(place, abstract_params, params)
