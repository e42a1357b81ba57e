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

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptjax.config import Config, config_from_dict, config_to_dict
from gptjax.errors import UserError, describe, warn
from gptjax.model import param_shapes
from gptjax.sharding import with_shardings

ITEMS = ("params", "opt", "data", "meta")
FORMAT_VERSION = 1


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
    """Saves and restores train state; `save` returns at once (async), `close` joins."""

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

        Unreadable newer steps are deleted once an older one restores, so that training can
        write those steps again. abstract_* are trees of jax.ShapeDtypeStruct carrying the
        target shardings."""
        bad = []
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
                     f"({describe(e)}); trying an older one")
                bad.append(step)
                continue
            for b in bad:
                warn(f"deleting unreadable checkpoint step {b}")
                self.manager.delete(b)
            return step, r.params, r.opt, r.data, r.meta
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_param_shapes(theirs: Any, mine: Any, what: str) -> None:
    """A UserError naming the first parameter of `mine` (a tree of arrays or shape structs)
    that `theirs` lacks or holds in another shape."""
    shapes = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(theirs)}
    for path, a in jax.tree_util.tree_leaves_with_path(mine):
        key = jax.tree_util.keystr(path)
        if shapes.get(key) != a.shape:
            raise UserError(f"{what}: parameter {key} has shape {shapes.get(key)} there but "
                            f"{a.shape} in this config")


def _manager_for_reading(run_dir: str | Path) -> ocp.CheckpointManager:
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise UserError(f"no checkpoint found in {run_dir} (expected {directory})")
    options = ocp.CheckpointManagerOptions(create=False)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _candidate_steps(manager: ocp.CheckpointManager, run_dir: str | Path,
                     step: int | None) -> list[int]:
    steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"no checkpoint found in {run_dir}")
    if step is None:
        return steps[::-1]  # newest first; older ones are fallbacks
    if step not in steps:
        raise UserError(f"no checkpoint at step {step} in {run_dir} (have {steps})")
    return [step]


def read_meta(run_dir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of `step`, or of the newest checkpoint whose meta is readable."""
    manager = _manager_for_reading(run_dir)
    try:
        for s in _candidate_steps(manager, run_dir, step):
            try:
                r = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return s, r.meta
            except Exception as e:  # noqa: BLE001
                warn(f"checkpoint step {s} in {run_dir} is unreadable ({describe(e)})")
        raise UserError(f"no readable checkpoint in {run_dir}")
    finally:
        manager.close()


def load_params(run_dir: str | Path, step: int | None = None, shardings: Any = None
                ) -> tuple[Any, Config, dict[str, Any], int]:
    """Parameters only (no optimizer state) of a run: (params, config, meta, step); without
    `step`, of the newest checkpoint that reads cleanly.

    shardings: optional tree of NamedShardings to restore into (default: one device)."""
    manager = _manager_for_reading(run_dir)
    try:
        for s in _candidate_steps(manager, run_dir, step):
            try:
                meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                cfg = config_from_dict(meta["config"])
                abstract = param_shapes(cfg.model)
                if shardings is not None:
                    abstract = with_shardings(abstract, shardings)
                r = manager.restore(
                    s, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
                )
                return r.params, cfg, meta, s
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001
                warn(f"checkpoint step {s} in {run_dir} is unreadable ({describe(e)})")
        raise UserError(f"no readable checkpoint in {run_dir}")
    finally:
        manager.close()
