"""Opening a source file as a binary stream, decompressed as it is read: gzip, and zstd frame
after frame (a stream cut short is an error, not a quiet end)."""

from __future__ import annotations

import gzip
import io
from typing import Any


def open_file(path: str) -> Any:
    """A binary stream of the file, decompressed as read (.gz, .zst)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), 1 << 20)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A .zst file decompressed as it is read, frame after frame. Unlike zstandard's own
    stream reader, a stream cut short is an error (EOFError), not a quiet early end."""

    def __init__(self, path: str) -> None:
        import zstandard  # the data extra

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._f, self._d, self._buf = open(path, "rb"), self._new(), b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            if self._d.eof:  # a frame ended: another may follow
                rest = self._d.unused_data or self._f.read(1 << 20)
                if not rest:
                    return 0
                self._d = self._new()
                self._buf = self._d.decompress(rest)
                continue
            chunk = self._f.read(1 << 20)
            if not chunk:
                raise EOFError("the zstd stream ends inside a frame (truncated)")
            self._buf = self._d.decompress(chunk)
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)
