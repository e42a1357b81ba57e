"""How much of a sample is real Python vocabulary: the share of its words (identifiers, keywords
and names, `[A-Za-z_][A-Za-z0-9_]*`, counted with repetition) that occur as words anywhere in
the running interpreter's standard library source, the demo's training corpus.

    python -m gptjax.bench.stdlib_words SAMPLE.txt  # or read the sample from stdin

One line: the share, the words counted and the distinct words that occur nowhere (at most 12).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from gptjax.data.sources import stdlib_files

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def stdlib_words() -> set[str]:
    words: set[str] = set()
    for _, path in stdlib_files():
        words.update(WORD.findall(path.read_bytes().decode("utf-8", "replace")))
    return words


def known_share(text: str, known: set[str]) -> tuple[float, int, list[str]]:
    """(share of the words of `text` in `known`, words counted, distinct unknown words)."""
    words = WORD.findall(text)
    unknown = [w for w in words if w not in known]
    share = 1 - len(unknown) / len(words) if words else 0.0
    return share, len(words), sorted(set(unknown))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptjax.bench.stdlib_words",
                                description=__doc__.splitlines()[0])
    p.add_argument("sample", nargs="?", help="a text file (default: stdin)")
    args = p.parse_args(argv)
    try:
        text = Path(args.sample).read_text(errors="replace") if args.sample else sys.stdin.read()
    except OSError as e:
        print(f"gptjax.bench.stdlib_words: error: cannot read {args.sample}: {e.strerror}",
              file=sys.stderr)
        return 2
    share, n, unknown = known_share(text, stdlib_words())
    print(f"{100 * share:.0f}% of the sample's {n} words occur in the standard library's source"
          + (f"; not: {', '.join(unknown[:12])}" if unknown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
