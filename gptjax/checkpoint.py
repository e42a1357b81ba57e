"""Checkpoints: an orbax CheckpointManager over four items per step.

  params  the model parameters (restorable alone, for sampling and fine-tuning)
  opt     the optimizer state and step counter
  data    the data iterator's JSON state, so a resumed run sees exactly the next batch
  meta    the resolved config and the tokenizer name

Orbax writes each step into a temporary directory and renames it when every item is committed,
so a step that is listed is complete. A latest step that still fails to restore (a file lost or
truncated) is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptjax.config import Config, UserError, config_from_dict, config_to_dict

ITEMS = ("params", "opt", "data", "meta")
FORMAT_VERSION = 1
log = logging.getLogger("gptjax")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def make_meta(cfg: Config, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "tokenizer": cfg.data.tokenizer,
        "config": config_to_dict(cfg),
    }
    meta.update(extra or {})
    return meta


class Checkpointer:
    """Saves and restores train state; `save` returns at once (async), `wait` joins."""

    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True) -> None:
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict[str, Any],
             meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, abstract_params: Any, abstract_opt: Any) -> tuple[int, Any, Any, dict, dict] | None:
        """The newest step that restores cleanly: (step, params, opt, data_state, meta), or None.

        abstract_* are trees of jax.ShapeDtypeStruct carrying the target shardings."""
        for step in reversed(self.all_steps()):
            try:
                r = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_params),
                        opt=ocp.args.StandardRestore(abstract_opt),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                warn(f"checkpoint step {step} in {self.directory} is unreadable "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one")
                continue
            return step, r.params, r.opt, r.data, r.meta
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _manager_for_reading(run_dir: str | Path) -> ocp.CheckpointManager:
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise UserError(f"no checkpoint found in {run_dir} (expected {directory})")
    options = ocp.CheckpointManagerOptions(create=False)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def read_meta(run_dir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of `step` or of the latest checkpoint in a run directory."""
    manager = _manager_for_reading(run_dir)
    steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"no checkpoint found in {run_dir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"no checkpoint at step {step} in {run_dir} (have {steps})")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    manager.close()
    return step, meta


def load_params(run_dir: str | Path, step: int | None = None, shardings: Any = None
                ) -> tuple[Any, Config, dict[str, Any], int]:
    """Parameters only (no optimizer state) of a run: (params, config, meta, step).

    shardings: optional tree of NamedShardings to restore into (default: one device)."""
    from gptjax.model import param_shapes

    step, meta = read_meta(run_dir, step)
    cfg = config_from_dict(meta["config"])
    abstract = param_shapes(cfg.model)
    if shardings is not None:
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    manager = _manager_for_reading(run_dir)
    try:
        r = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"checkpoint step {step} in {run_dir} is unreadable: "
                        f"{str(e).splitlines()[0][:200]}") from None
    finally:
        manager.close()
    return r.params, cfg, meta, step
