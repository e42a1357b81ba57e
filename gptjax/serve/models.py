"""The models a server offers: one base and the LoRA adapters over it, each under a name.

`--checkpoint RUN` is served under RUN's directory name. When RUN is a LoRA run, that name is
the base with RUN's adapters, and the bare base is served too, under its own directory's name
(with "-base" added if the two names are equal). Each `--adapter NAME=LORA_RUN` adds NAME: a
LoRA run over the same base (its recorded checksum equals the served base's) and the same model
config. A request's `model` picks one; rows of different adapters share the engine's batch.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax

from gptjax.config import Config, ModelConfig, config_to_dict
from gptjax.errors import UserError
from gptjax.lora import adapters as lora_lib
from gptjax.lora import runs
from gptjax.model import LORA


@dataclasses.dataclass
class Served:
    base: Any  # the base's parameters, without adapters
    cfg: Config
    meta: dict[str, Any]
    step: int
    default: str  # the model a request without `model` gets: --checkpoint's
    root: str  # the base's name
    names: dict[str, int]  # model name -> adapter index (0: the base itself)
    adapters: list[Any]  # inference form; index i + 1 of `names` is adapters[i]


def adapter_arg(text: str) -> tuple[str, str]:
    """--adapter NAME=RUN_DIR."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"want NAME=RUN_DIR, got {text!r}")
    return name.strip(), str(Path(path.strip()).expanduser())


def load(run_dir: str, step: int | None, shardings: Any,
         extra: list[tuple[str, str]]) -> Served:
    """The base and adapters of --checkpoint and each --adapter (NAME, RUN_DIR), checked."""
    params, cfg, meta, step = runs.load_model(run_dir, step, shardings)
    name = Path(run_dir).resolve().name
    base = {k: v for k, v in params.items() if k != LORA}
    served = Served(base, cfg, meta, step, name, name, {name: 0}, [])
    if LORA in params:
        root = Path(meta[runs.BASE_KEY]["path"]).name
        served.root = root if root != name else f"{name}-base"
        served.names = {served.root: 0, name: 1}
        served.adapters.append(params[LORA])
    checksum = runs.base_checksum(base) if extra else None
    for adapter_name, adapter_dir in extra:
        if adapter_name in served.names:
            raise UserError(f"--adapter {adapter_name}=...: the name {adapter_name!r} is taken "
                            f"(served: {', '.join(served.names)})")
        served.adapters.append(_adapter(adapter_name, adapter_dir, cfg.model, checksum))
        served.names[adapter_name] = len(served.adapters)
    return served


def _adapter(name: str, run_dir: str, model: ModelConfig, checksum: str) -> Any:
    what = f"--adapter {name}={run_dir}"
    try:
        ad, cfg, meta, _ = runs.read_adapters(run_dir)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    theirs, ours = config_to_dict(cfg)["model"], config_to_dict(Config(model=model))["model"]
    for k in sorted(theirs):
        if k not in ModelConfig.EXECUTION_FIELDS and theirs[k] != ours.get(k):
            raise UserError(f"{what}: model.{k} is {theirs[k]!r} there but {ours.get(k)!r} in "
                            "the served model")
    if meta[runs.BASE_KEY]["checksum"] != checksum:
        raise UserError(f"{what}: trained over another base ({meta[runs.BASE_KEY]['path']}, "
                        f"checksum {meta[runs.BASE_KEY]['checksum']}; the served base's is "
                        f"{checksum})")
    return jax.device_get(lora_lib.scaled(ad, lora_lib.LoraSpec.of(cfg.train)))


def describe(served: Served) -> str:
    others = [n for n in served.names if n != served.default]
    return served.default + (f" (also: {', '.join(others)})" if others else "")

