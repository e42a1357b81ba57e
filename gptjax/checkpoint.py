"""Checkpoints: an orbax CheckpointManager over four items per step.

  params  the model parameters (restorable alone, for sampling and fine-tuning)
  opt     the optimizer state and step counter
  data    the data iterator's JSON state, so a resumed run sees exactly the next batch
  meta    the resolved config, the tokenizer name, and a checksum of every saved array

Orbax writes each step into a temporary directory and renames it when every item is committed,
so a step that is listed is complete. A step that fails to restore, or whose arrays fail their
checksums or are not finite, is unreadable: the newest readable step is used, and newer
unreadable ones are moved aside (never deleted). When no step is readable the run stops.
"""

from __future__ import annotations

import fcntl
import gc
import io
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from gptjax.config import Config, config_from_dict, config_to_dict
from gptjax.errors import UserError, describe, warn
from gptjax.model import param_shapes
from gptjax.sharding import with_shardings

ITEMS = ("params", "opt", "data", "meta")
FORMAT_VERSION = 1
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(UserError):
    """A checkpoint could not be written or none could be read; one line says which and why."""


def run_path(run_dir: str | Path) -> Path | epath.Path:
    """A run directory as a path: local ones absolute, with `~` expanded; URLs (gs://…) through
    etils.epath, as orbax takes them (pathlib would turn gs://b/x into the local gs:/b/x)."""
    if "://" in str(run_dir):
        return epath.Path(str(run_dir))
    return Path(run_dir).expanduser().resolve()


def checkpoint_dir(run_dir: str | Path) -> Path | epath.Path:
    return run_path(run_dir) / "checkpoints"


def make_meta(cfg: Config, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "tokenizer": cfg.data.tokenizer,
        "config": config_to_dict(cfg),
    }
    meta.update(extra or {})
    return meta


# --------------------------------------------------------------------------- integrity


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A 32-bit checksum of an array's bytes: the sum of its words, each times a distinct odd
    weight, modulo 2**32. Any one flipped bit changes it, and integer sums do not depend on the
    order of reduction, so the same array sharded any way gives the same value."""
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksums_on_device(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksum, tree)


def tree_checksums(tree: Any) -> dict[str, int]:
    """Checksum of each array of a tree, by its path (one small transfer from the devices)."""
    sums = jax.device_get(_checksums_on_device(tree))
    return {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(sums)}


@jax.jit
def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """Whether every float array of a tree is finite: one program per tree structure (a check
    per leaf would compile two small programs per leaf shape), one scalar read."""
    return bool(_finite(tree))


def verify(item: str, tree: Any, meta: dict[str, Any]) -> str | None:
    """Why a restored item is unusable (a checksum that differs from the one saved with it, or
    a value that is not finite), or None. Checkpoints from before checksums were recorded are
    checked for finiteness only."""
    saved = meta.get("checksums", {}).get(item)
    if saved is not None:
        got = tree_checksums(tree)
        bad = [k for k in saved if got.get(k) != saved[k]]
        if bad or set(got) != set(saved):
            return f"{item} {bad[0] if bad else ''} fails its checksum".replace("  ", " ")
    if not all_finite(tree):
        return f"{item} holds values that are not finite"
    return None


@contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs a traceback for every failed read or write, and a failed read leaves more
    behind: 'Exception ignored in coroutine' reports, and the reads of the step's other arrays,
    finishing on tensorstore's threads, print tracebacks straight to sys.stderr for a moment
    after the failure. gptjax says what happened in one line instead, so all of that is kept off
    the terminal while orbax works, and after a failure until it has gone quiet."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels, hook, stderr = [lg.level for lg in loggers], sys.unraisablehook, sys.stderr
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    sys.stderr = sink = io.StringIO()
    try:
        yield
    except BaseException:
        # Failed coroutines and futures report when collected: collect them now. Only here: a
        # full collection costs ~0.3 s in a process holding JAX and TensorFlow, which each save
        # would otherwise spend (up to three times) in the training loop.
        gc.collect()
        _wait_until_quiet(sink)
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        sys.unraisablehook, sys.stderr = hook, stderr


def _wait_until_quiet(sink: io.StringIO, still: float = 0.3, most: float = 5.0) -> None:
    """Until nothing was written to `sink` for `still` seconds (at most `most`)."""
    start = last_change = time.monotonic()
    size = sink.tell()
    while time.monotonic() - last_change < still and time.monotonic() - start < most:
        time.sleep(0.05)
        if sink.tell() != size:
            size, last_change = sink.tell(), time.monotonic()


# --------------------------------------------------------------------------- writing and resuming


class Checkpointer:
    """Saves and restores train state. `save` returns at once (the write goes on in the
    background); a write that failed is reported at the next `save` or at `close`."""

    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True) -> None:
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        try:
            with _quiet_orbax():
                self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                     item_names=ITEMS)
        except OSError as e:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints "
                                  f"({describe(e)})") from None
        self.writing: int | None = None  # the step whose write may still be going on

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _raise_write_error(self, e: BaseException) -> None:
        kept = [s for s in self.all_steps() if s != self.writing]
        raise CheckpointError(
            f"writing checkpoint step {self.writing} to {self.directory} failed ({describe(e)}); "
            f"the steps committed before it are intact ({kept or 'none'})") from None

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict[str, Any],
             meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return
        meta = dict(meta, checksums={"params": tree_checksums(params),
                                     "opt": tree_checksums(opt_state)})
        try:
            with _quiet_orbax():  # the previous write's outcome (orbax's save waits for it too)
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - any failure to write ends the run in one line
            self._raise_write_error(e)
        self.writing = step
        try:
            with _quiet_orbax():
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
        except Exception as e:  # noqa: BLE001 - any failure to write ends the run in one line
            self._raise_write_error(e)

    def restore(self, abstract_params: Any, abstract_opt: Any
                ) -> tuple[int, Any, Any, dict, dict] | None:
        """The newest readable step: (step, params, opt, data_state, meta); None when there is
        no checkpoint. Newer unreadable steps are moved aside, so the run can write those steps
        again; when no step is readable, a CheckpointError names each and why, and nothing is
        moved. abstract_* are trees of ShapeDtypeStructs carrying the target shardings."""
        reasons: dict[int, str] = {}
        for step in reversed(self.all_steps()):
            try:
                with _quiet_orbax():
                    r = self.manager.restore(step, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_params),
                        opt=ocp.args.StandardRestore(abstract_opt),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ))
                why = verify("params", r.params, r.meta) or verify("opt", r.opt, r.meta)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                why = describe(e)
            if why is None:
                for bad in reasons:
                    self._move_aside(bad, reasons[bad])
                return step, r.params, r.opt, r.data, r.meta
            reasons[step] = why
        if reasons:
            listed = "; ".join(f"step {s}: {w}" for s, w in reasons.items())
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored ({listed}); "
                                  f"nothing was changed: fix the cause, or start from these "
                                  f"parameters in a new train.run_dir with train.init_from")
        return None

    def _move_aside(self, step: int, why: str) -> None:
        target = self.directory.parent / UNREADABLE_DIR / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
        # The run directory is shared by every process: one moves, all wait, all re-list.
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"gptjax: moved aside checkpoint step {step}")
        self.manager.reload()
        warn(f"checkpoint step {step} is unreadable ({why}); moved to {target} and resuming "
             f"from an older step")

    def close(self) -> None:
        """Waits for the last write; a failure is a CheckpointError, after orbax is shut down."""
        error = None
        try:
            with _quiet_orbax():
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            error = e
        finally:
            # The write's own error is the one to report. suppress sits outside the quiet
            # block, so that block's failure path still collects what a failed close leaves.
            with suppress(Exception), _quiet_orbax():
                self.manager.close()
        if error is not None:
            self._raise_write_error(error)


class RunLock:
    """One trainer per run directory: an exclusive flock on RUN_DIR/lock, which records the
    holder's host and pid. The kernel drops a flock when its process dies (kill -9 included),
    so a lock left by a dead trainer is taken over, with a line saying so. Object stores
    (gs://) have no locks: there the run is not locked, with a warning."""

    FILE = "lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(run_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        if "://" in self.run_dir:
            warn(f"{self.run_dir} is on an object store, which has no file locks: nothing stops "
                 f"a second trainer from writing into it")
            return
        path = Path(self.run_dir) / self.FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"train.run_dir={self.run_dir} cannot be used ({describe(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"train.run_dir={self.run_dir} is in use by another trainer "
                            f"({holder}); wait for it to end or use another train.run_dir") from None
        stale = os.read(fd, 4096).decode(errors="replace").strip()
        if stale:
            warn(f"taking over the lock of {self.run_dir} from a trainer that is gone ({stale})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean end leaves no holder to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_param_shapes(theirs: Any, mine: Any, what: str) -> None:
    """A UserError naming the first parameter of `mine` (a tree of arrays or shape structs)
    that `theirs` lacks or holds in another shape."""
    shapes = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(theirs)}
    for path, a in jax.tree_util.tree_leaves_with_path(mine):
        key = jax.tree_util.keystr(path)
        if shapes.get(key) != a.shape:
            raise UserError(f"{what}: parameter {key} has shape {shapes.get(key)} there but "
                            f"{a.shape} in this config")


# --------------------------------------------------------------------------- reading runs
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
    """(step, meta) of `step`, or of the newest checkpoint whose meta is readable (the caller
    that restores the step reports unreadable ones)."""
    manager = _manager_for_reading(run_dir)
    reasons = []
    try:
        for s in _candidate_steps(manager, run_dir, step):
            try:
                with _quiet_orbax():
                    r = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return s, r.meta
            except Exception as e:  # noqa: BLE001
                reasons.append(f"step {s}: {describe(e)}")
        raise UserError(f"no readable checkpoint in {run_dir} ({'; '.join(reasons)})")
    finally:
        manager.close()


def load_params(run_dir: str | Path, step: int | None = None, shardings: Any = None,
                abstract: Any = None) -> tuple[Any, Config, dict[str, Any], int]:
    """Parameters only (no optimizer state) of a run: (params, config, meta, step); without
    `step`, of the newest checkpoint that reads cleanly. A LoRA run's are its adapters alone
    (gptjax.lora.runs.load_model adds the base).

    shardings: optional tree of NamedShardings to restore into (default: one device).
    abstract: the tree to restore into, when it is not the config's model parameters."""
    manager = _manager_for_reading(run_dir)
    reasons: dict[int, str] = {}
    try:
        for s in _candidate_steps(manager, run_dir, step):
            try:
                with _quiet_orbax():
                    meta = manager.restore(
                        s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                cfg = config_from_dict(meta["config"])
                target = abstract
                if target is None:
                    target = param_shapes(cfg.model)
                    if shardings is not None:
                        target = with_shardings(target, shardings)
                with _quiet_orbax():
                    params = manager.restore(s, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(target))).params
                why = verify("params", params, meta)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001
                why = describe(e)
            if why is None:
                for bad, bad_why in reasons.items():
                    warn(f"checkpoint step {bad} in {run_dir} is unreadable ({bad_why}); "
                         f"using step {s}")
                return params, cfg, meta, s
            reasons[s] = why
        listed = "; ".join(f"step {s}: {w}" for s, w in reasons.items())
        raise UserError(f"no readable checkpoint in {run_dir} ({listed})")
    finally:
        manager.close()
