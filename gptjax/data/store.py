"""Where a token cache lies, and reading its token shards as one array.

A cache directory is a local path or a URL. Local files are written under a temporary name and
renamed, and read through memory maps. A URL (`gs://bucket/dir`, also `file:///abs/dir`) goes
through tensorstore's key-value stores, as orbax's checkpoints do: each object written whole, and
read with ranged requests, so a process reads only the windows of its own rows, never a shard
whole. `file://` runs that same path on a local disk, which is how the tests exercise it.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.data.sources import DataError


def is_url(path: str) -> bool:
    return "://" in path


class Store:
    """One directory of a local disk or an object store, by name of the files in it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root).rstrip("/") or "/"
        self.remote = is_url(self.root)
        self._kv: Any = None
        if self.remote:
            import tensorstore as ts  # an orbax dependency

            try:
                self._kv = ts.KvStore.open(self.root + "/").result()
            except (ValueError, RuntimeError) as e:
                raise DataError(f"data.cache_dir={self.root} cannot be opened: {e}") from None

    def __str__(self) -> str:
        return self.root

    @property
    def path(self) -> Path | str:
        """The local directory, or the URL."""
        return self.root if self.remote else Path(self.root)

    def sub(self, name: str) -> Store:
        return Store(f"{self.root}/{name}")

    def _kv_call(self, what: str, fn: Any, *args: Any) -> Any:
        """A tensorstore call, its failure (permissions, network) one OSError naming the path."""
        try:
            return fn(*args).result()
        except (ValueError, RuntimeError) as e:
            raise OSError(f"{what} {self.root}: {str(e).splitlines()[0][:300]}") from None

    def read_bytes(self, name: str) -> bytes | None:
        """A file's contents; None when it does not exist."""
        if self.remote:
            r = self._kv_call(f"cannot read {name} in", self._kv.read, name)
            return r.value if r.state == "value" else None
        try:
            return (Path(self.root) / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no such file, or no such directory
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes a whole file at once: no reader ever sees part of it."""
        if self.remote:
            self._kv_call(f"cannot write {name} in", self._kv.write, name, data)
            return
        target = Path(self.root) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A local directory to write files in before `put` moves them here: this directory
        itself when local (so `put` is a rename), else a temporary one."""
        if not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            yield Path(self.root)
            return
        tmp = Path(tempfile.mkdtemp(prefix="gptjax-shard-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def put(self, name: str, local: Path) -> None:
        """Moves a finished local file (in `staging()`) to `name`."""
        if self.remote:
            self.write_bytes(name, local.read_bytes())
            local.unlink()
        else:
            os.replace(local, Path(self.root) / name)

    def names(self) -> list[str]:
        """The names of the files in this directory (none when it does not exist)."""
        if self.remote:
            keys = self._kv_call("cannot list", self._kv.list)
            return sorted(k.decode() for k in keys if b"/" not in k)
        try:
            return sorted(p.name for p in Path(self.root).iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, name: str | None = None) -> None:
        """Deletes one file, or the whole directory."""
        if self.remote:
            import tensorstore as ts

            if name is None:
                self._kv_call("cannot delete", self._kv.delete_range, ts.KvStore.KeyRange())
            else:
                self._kv_call(f"cannot delete {name} in", self._kv.write, name, None)
        elif name is None:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                (Path(self.root) / name).unlink()

    def size(self, name: str) -> int | None:
        """A local file's size (-1 when missing); None for every file of a URL, whose objects
        tensorstore cannot stat: a read past a short object's end fails instead."""
        if self.remote:
            return None
        try:
            return (Path(self.root) / name).stat().st_size
        except OSError:
            return -1

    def array(self, name: str, dtype: Any, n: int) -> np.ndarray | RangedFile:
        """A read-only view of a file of `n` items of `dtype`."""
        if self.remote:
            return RangedFile(self._kv, name, np.dtype(dtype), n, f"{self.root}/{name}")
        if n == 0:
            return np.zeros(0, dtype)
        return np.memmap(Path(self.root) / name, dtype=dtype, mode="r", shape=(n,))


class RangedFile:
    """A file of an object store read by byte ranges."""

    def __init__(self, kv: Any, key: str, dtype: np.dtype, n: int, where: str) -> None:
        self.kv, self.key, self.dtype, self.n, self.where = kv, key, dtype, n, where

    def request(self, lo: int, hi: int, batch: Any) -> Any:
        """Items [lo, hi), requested as part of a tensorstore batch: a future for `take`."""
        size = self.dtype.itemsize
        return self.kv.read(self.key, byte_range=slice(lo * size, hi * size), batch=batch)

    def take(self, future: Any, lo: int, hi: int) -> np.ndarray:
        try:
            r = future.result()
        except (ValueError, RuntimeError) as e:
            raise DataError(f"cannot read token cache file {self.where}: {e}") from None
        if r.state != "value" or len(r.value) != (hi - lo) * self.dtype.itemsize:
            raise DataError(
                f"token cache file {self.where} is missing or shorter than its manifest says"
            )
        return np.frombuffer(r.value, self.dtype)


def read_ranges(requests: Sequence[tuple[RangedFile, int, int]]) -> list[np.ndarray]:
    """Items [lo, hi) of each file, all requested at once (one tensorstore batch), so a batch
    of rows spread over many shards costs one round trip, not one per shard."""
    if not requests:
        return []
    import tensorstore as ts

    batch = ts.Batch()
    futures = [f.request(lo, hi, batch) for f, lo, hi in requests]
    batch.submit()
    return [f.take(fut, lo, hi) for (f, lo, hi), fut in zip(requests, futures)]


class TokenArray:
    """A read-only 1-D array made of consecutive parts (shards); a part may be None, which reads
    as `fill` (a shard with no loss weights weighs every token 1). Rows are cut with `rows`;
    indexing with a slice or an int, `len` and `np.asarray` work as on an array."""

    def __init__(self, parts: Sequence[Any], lengths: Sequence[int], dtype: Any, fill: int = 0):
        self.parts, self.lengths = list(parts), [int(n) for n in lengths]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).tolist()
        self.dtype = np.dtype(dtype)
        self.fill = fill

    def __len__(self) -> int:
        return self.offsets[-1]

    def rows(self, starts: Sequence[int] | np.ndarray, span: int, dtype: Any = None
             ) -> np.ndarray:
        """[len(starts), span]: the items [s, s + span) for each start s, a row crossing a shard
        boundary read from both."""
        out = np.empty((len(starts), span), dtype or self.dtype)
        remote: list[tuple[int, int, int, int, int]] = []  # (row, col, part, lo, hi)
        for r, s in enumerate(starts):
            s = int(s)
            if s < 0 or s + span > len(self):
                raise IndexError(f"rows [{s}, {s + span}) outside [0, {len(self)})")
            col = 0
            while col < span:
                p = bisect.bisect_right(self.offsets, s + col) - 1
                lo = s + col - self.offsets[p]
                hi = min(lo + span - col, self.lengths[p])
                part = self.parts[p]
                if part is None:
                    out[r, col : col + hi - lo] = self.fill
                elif isinstance(part, RangedFile):
                    remote.append((r, col, p, lo, hi))
                else:
                    out[r, col : col + hi - lo] = part[lo:hi]
                col += hi - lo
        got = read_ranges([(self.parts[p], lo, hi) for _, _, p, lo, hi in remote])
        for (r, col, _, lo, hi), values in zip(remote, got):
            out[r, col : col + hi - lo] = values
        return out

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            return self.rows([start], max(0, stop - start))[0]
        i = int(key) + (len(self) if int(key) < 0 else 0)
        return self.rows([i], 1)[0, 0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype)

    def __iter__(self) -> Iterator[Any]:
        return iter(self[:])
