"""Integrity of the token cache: the sha256 of each data file is recorded when the cache is built
and checked again whenever the file may have changed since it was last checked.

Hashing a 100 GB cache on every load would cost minutes, so a stamp file beside the manifest
records how each file looked (size, mtime, ctime, inode) when its checksum was last confirmed. A
load whose files still look that way trusts them after one stat each; any other look (a `touch`,
a copy, an overwrite) re-hashes the file once and, on a match, adds the new look to the stamp.
ctime is in the look because no user call can set it: an overwrite that restores the old mtime
(`rsync --inplace -t`, `cp --preserve`) still changes it.

File times tick coarsely (a few ms, or a second on some filesystems): a write in the same tick as
the file's last change would leave its look unchanged. So a look is only stamped once the
filesystem's clock has moved past it (git's "racily clean" index entries, avoided by waiting).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from gptjax.data.sources import DataError

STAMP_FILE = "verified.json"
STAMP_FORMAT = 1
# Looks kept per file, newest first: hosts sharing one cache through a network filesystem may each
# see other inode numbers, and each should pay for one re-hash, not one per load.
MAX_LOOKS = 64
READ_BLOCK = 8 << 20
# How long a stamp waits for the filesystem's clock to pass the looks it records; a look still as
# new as the clock after that is left out (the next load re-hashes that file).
SETTLE_SECONDS = 2.5


class CorruptCacheError(DataError):
    """A token cache file differs from what its build wrote (or holds ids no tokenizer made)."""


def fix_hint(cache_path: Path) -> str:
    return f"delete the token cache directory {cache_path} and it is rebuilt on the next run"


class HashingWriter:
    """A binary file that hashes what is written to it, so a build needs no second pass."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in large blocks (hashlib releases the GIL on each)."""
    sha = hashlib.sha256()
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        with contextlib.suppress(AttributeError, OSError):  # a hint; not on every platform
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


def recorded_checksums(manifest: dict) -> dict[str, str]:
    """{file name: sha256 recorded at build} of the cache's data files."""
    out = {}
    for s in manifest["shards"]:
        out[s["file"]] = s["sha256"]
        if s["mask"]:
            out[s["mask"]] = s["mask_sha256"]
    return out


def _look(path: Path, sha256: str) -> dict[str, Any]:
    st = os.stat(path)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        # A look vouches for one recorded checksum only: a manifest that records another one
        # (edited by hand, say) is checked afresh.
        "sha256": sha256,
    }


def _read_stamp(path: Path) -> dict[str, list[dict]]:
    """{file name: looks} of the stamp; empty when it is missing or unreadable (a re-hash then
    decides, so a damaged stamp costs time, never correctness)."""
    try:
        stamp = json.loads((path / STAMP_FILE).read_text())
        looks = stamp["files"] if stamp.get("format") == STAMP_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    if not isinstance(looks, dict):
        return {}
    return {k: v for k, v in looks.items() if isinstance(v, list)}


def _stamp_text(path: Path, confirmed: dict[str, dict]) -> str:
    looks = _read_stamp(path)  # read again: another process may have added looks meanwhile
    for name, look in confirmed.items():
        looks[name] = [look, *(v for v in looks.get(name, []) if v != look)][:MAX_LOOKS]
    return json.dumps({"format": STAMP_FORMAT, "files": looks}, indent=1) + "\n"


def _write_stamp(path: Path, confirmed: dict[str, dict]) -> None:
    """Adds the confirmed looks to the stamp: a temporary file renamed over the old stamp, so
    processes that verify at once never leave a torn one (at worst one's looks are lost and it
    re-hashes next time). A read-only cache keeps its old stamp, quietly."""
    tmp = path / f".{STAMP_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    deadline = time.monotonic() + SETTLE_SECONDS
    try:
        while True:
            tmp.write_text(_stamp_text(path, confirmed))
            now = tmp.stat().st_mtime_ns  # the filesystem's clock, in the data files' ticks
            racy = {n for n, v in confirmed.items() if max(v["mtime_ns"], v["ctime_ns"]) >= now}
            if not racy:
                break
            if time.monotonic() > deadline:
                confirmed = {n: v for n, v in confirmed.items() if n not in racy}
                tmp.write_text(_stamp_text(path, confirmed))
                break
            time.sleep(0.005)
        os.replace(tmp, path / STAMP_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def stamp_built(path: Path, manifest: dict) -> None:
    """Stamps the files a build just wrote with the checksums it computed while writing them."""
    _write_stamp(
        path, {name: _look(path / name, sha) for name, sha in recorded_checksums(manifest).items()}
    )


def verify(path: Path, manifest: dict) -> None:
    """Checks the data files of the cache at `path` against the checksums of its manifest: a stat
    each when they look as when last confirmed, a full re-hash otherwise.

    Raises:
        CorruptCacheError: a file's contents differ from what its build wrote.
        DataError: a file cannot be read.
    """
    looks = _read_stamp(path)
    confirmed = {}
    for name, sha in recorded_checksums(manifest).items():
        file = path / name
        try:
            # The look is taken before hashing: a change during the hash then shows up next time.
            look = _look(file, sha)
            if look in looks.get(name, []):
                continue
            actual = file_sha256(file)
        except OSError as e:
            raise DataError(f"cannot read token cache file {file}: {e.strerror or e}") from None
        if actual != sha:
            raise CorruptCacheError(
                f"token cache file {file} does not match the sha256 its manifest records (it "
                f"was changed after the cache was built); {fix_hint(path)}"
            )
        confirmed[name] = look
    if confirmed:
        _write_stamp(path, confirmed)
