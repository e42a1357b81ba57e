"""What every command line shares: user mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from gptjax.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (argparse would print the usage block too)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Runs a command's body and returns its exit code: a UserError is one line
    `PROG: error: message` on stderr and code 2; Ctrl-C that reaches here is 130, quietly; a
    reader that went away (`| head`) ends it quietly with 0."""
    try:
        return body() or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# --------------------------------------------------------------------------- argument types
# argparse `type=` functions: a bad value raises ArgumentTypeError, which OneLineParser prints as
# one line naming the flag, before the command does anything. A value that is no number at all
# gets argparse's own wording (`invalid int value: 'x'`).


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """A `type=` for integers >= low."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            need = "positive" if low == 1 else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {need}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, at least one: `1,64`."""
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return tuple(positive_int(s) for s in items)


def fraction(text: str) -> float:
    """A number in (0, 1] (NaN is not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def host_port(text: str) -> str:
    """`HOST:PORT` with a port in 1..65535 (an IPv6 host in brackets: `[::1]:1234`)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be a number in 1..65535, got {port!r}")
    return text


def user_path(text: str) -> str:
    """A path as the user wrote it, `~` expanded (the shell leaves `--flag=~/x` alone)."""
    return os.path.expanduser(text)


def out_dir(text: str) -> str:
    """A directory to write into: `~` expanded; not an existing file; it, or the nearest of its
    parents that exists (where it would be created), must take new files. Checked by creating
    and removing an empty directory there: unlike os.access, that is right for root and on
    read-only mounts too."""
    path = parent = Path(user_path(text))
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{parent} is not a directory, so {path} cannot "
                                             "be made")
        tempfile.TemporaryDirectory(dir=parent, prefix=".gptjax-probe-").cleanup()
    except OSError:
        raise argparse.ArgumentTypeError(f"cannot write in {parent}") from None
    return str(path)
