"""The error classes and the warning line every part of gptjax uses, and `refused` for imports
that must fail. Imports nothing of gptjax, so any module can import it without a cycle."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
    """A mistake of the user's (bad input, missing file, ...). CLIs print its one-line message to
    stderr and exit with code 2; library callers can catch it."""


class ConfigError(UserError):
    """A mistake in a config file or override; the message is one line naming the key."""


def warn(message: str) -> None:
    """One `warning: …` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def describe(e: BaseException) -> str:
    """`Type: first line of the message` (some exceptions have an empty message)."""
    first = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextlib.contextmanager
def refused(module: str) -> Iterator[None]:
    """Within it, `import module` raises ImportError, as if it were not installed (unless it is
    already loaded). For libraries that import an optional heavy module we never use from them,
    and skip it when the import fails."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  # importing it raises ImportError
    try:
        yield
    finally:
        del sys.modules[module]
