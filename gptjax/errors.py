"""The error classes and the warning line every part of gptjax uses. Imports nothing of gptjax,
so any module can import it without a cycle."""

from __future__ import annotations

import sys


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
