"""The token cache: each split of a source is tokenized once into a directory of
`data.cache_dir` named by a digest of everything that decides its contents (plan.py), built in
resumable shards (shards.py) and complete once its manifest is written; load.py reads it back.

One cache may serve many processes and hosts. In a local or network directory a file lock lets
one process build while the others wait for it (on hosts that do not share the directory, each
builds its own). A URL (gs://) has no lock: process 0 builds and the others wait for the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.config import Config
from gptjax.data.plan import CACHE_FORMAT, SPLITS, Plan, make_plan, num_workers
from gptjax.data.shards import MANIFEST_FILE, BuildStopped, build, sizes_ok
from gptjax.data.sources import DataError
from gptjax.data.store import Store
from gptjax.tokenizer import get_tokenizer

__all__ = ["SPLITS", "ensure_cache", "num_workers", "read_manifest"]

# How often a process waiting for process 0's build looks for its manifest.
WAIT_POLL_SECONDS = 1.0


def read_manifest(store: Store) -> dict | None:
    """The manifest of a complete cache: None when there is none, it does not parse, or a shard
    file is not the size it records (where the store can tell). A store that cannot be read
    raises OSError: an unreadable cache is not a missing one, and must not be rebuilt over."""
    raw = store.read_bytes(MANIFEST_FILE)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
        if not sizes_ok(store, manifest["shards"], np.dtype(manifest["dtype"]).itemsize):
            return None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _matches(manifest: dict | None, plan: Plan) -> bool:
    return (
        manifest is not None
        and manifest.get("format") == CACHE_FORMAT
        and manifest.get("digest") == plan.digest()
        and manifest.get("tokenizer") == plan.tokenizer.spec()
    )


@contextlib.contextmanager
def _build_lock(root: Store, name: str) -> Iterator[None]:
    """Holds the lock of cache `name` under a local or network directory (a URL has none). The
    lock is released when the process ends, however it ends, so a killed builder blocks none."""
    if root.remote:
        yield
        return
    directory = Path(root.root)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        why = ("is not a directory" if directory.exists() and not directory.is_dir()
               else f"cannot be written ({e.strerror or e})")
        raise DataError(
            f"data.cache_dir={directory} {why}, and the token cache {name} must be built "
            "there; set data.cache_dir to a writable directory"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"token cache {directory / name}: waiting for the process building it",
                  file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_store() -> Any:
    """The key-value store of this jax.distributed run (what orbax uses to signal between
    processes), or None: one process, or JAX not started as several."""
    if "jax" not in sys.modules:
        return None
    try:
        from jax._src import distributed
    except ImportError:
        return None
    return getattr(distributed.global_state, "client", None)


def _signal_key(cfg: Config, split: str) -> str:
    """The run's key for one cache: by what every process asks for (not by the digest, which
    differs where a host sees other files), so a process that asks for another cache than
    process 0 built hears of it instead of waiting for a directory nobody builds."""
    blob = json.dumps([cfg.data.cache_dir, cfg.data.source, cfg.data.tokenizer, split])
    return f"gptjax/token-cache/{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _tell_waiters(key: str, outcome: str) -> None:
    """Process 0 says how its build ended ("ok:" and the cache's name, or "failed:" and why),
    so that the processes waiting for it stop waiting: a failed builder would otherwise leave
    them polling forever, and itself stuck in jax.distributed's shutdown, which waits for
    them."""
    client = _run_store()
    if client is not None:
        with contextlib.suppress(Exception):  # a run without a coordination service
            client.key_value_set(key, outcome, allow_overwrite=True)


def _wait_for_builder(plan: Plan, store: Store, key: str) -> dict:
    """The manifest process 0 writes, once it is there."""
    print(f"token cache {store}: waiting for process 0 to build it", file=sys.stderr)
    client = _run_store()
    while not _matches(manifest := read_manifest(store), plan):
        outcome = ""
        if client is not None:
            with contextlib.suppress(Exception):  # a missing key raises in some versions
                outcome = client.key_value_try_get(key) or ""
        if outcome.startswith("failed:"):
            raise DataError(f"process 0 could not build the token cache {store}: "
                            f"{outcome[len('failed:'):]}")
        if outcome.startswith("ok:") and outcome[3:] != plan.dir_name():
            raise DataError(
                f"process 0 built the token cache {outcome[3:]}, but this process needs "
                f"{plan.dir_name()}: its source files differ (path, size or modification "
                f"time); every host must see the same data.source files")
        time.sleep(WAIT_POLL_SECONDS)
    return manifest


def ensure_cache(cfg: Config, split: str, *, process_index: int = 0
                 ) -> tuple[dict, Path | str, bool]:
    """Builds `split`'s token cache unless a matching one exists; with a URL as
    data.cache_dir, only process 0 builds and the others wait for it.

    Returns:
        (its manifest, its directory (a Path, or the URL), whether this call built it).
    """
    plan = make_plan(cfg, split, get_tokenizer(cfg.data.tokenizer))
    root = Store(cfg.data.cache_dir)
    store = root.sub(plan.dir_name())
    try:
        if not root.remote:
            return _find_or_build(plan, root, store, num_workers(cfg))
        key = _signal_key(cfg, split)
        if process_index != 0:
            return _wait_for_builder(plan, store, key), store.path, False
        try:
            found = _find_or_build(plan, root, store, num_workers(cfg))
        except (DataError, OSError) as e:  # a bad source; a bucket that refuses a write
            _tell_waiters(key, f"failed:{e}")
            raise
        except BaseException:
            _tell_waiters(key, "failed:its build was interrupted")
            raise
        _tell_waiters(key, f"ok:{plan.dir_name()}")
        return found
    except OSError as e:  # a full disk, a read-only directory, a bucket denied: one line
        raise DataError(f"token cache {store}: {e}") from None


def _find_or_build(plan: Plan, root: Store, store: Store, workers: int
                   ) -> tuple[dict, Path | str, bool]:
    manifest = read_manifest(store)
    if _matches(manifest, plan):
        return manifest, store.path, False
    with _build_lock(root, plan.dir_name()):
        manifest = read_manifest(store)
        if _matches(manifest, plan):  # another process built it while this one waited
            return manifest, store.path, False
        if MANIFEST_FILE in store.names():  # one that does not match, or its files do not
            print(f"token cache {store} is stale or incomplete; rebuilding", file=sys.stderr)
            store.remove()
        try:
            return build(plan, store, workers), store.path, True
        except BuildStopped:
            raise
        except DataError:
            store.remove()  # a source that cannot be read: keep nothing of this build
            raise
