"""What every command line shares: user mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (argparse would print the usage block too)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def fail(message: str) -> NoReturn:
    """Reports a user mistake and exits 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
