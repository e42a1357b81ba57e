"""What every command line shares: user mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
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
