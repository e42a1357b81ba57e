"""The docs stay true to the code: the config reference lists exactly the keys `train.py --help`
prints, every CLI flag is documented, the README stays short, and every relative link resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_CHARS = 12_000

# Scripts whose argparse flags must be documented: each command's parser module, and every
# module of the package that declares a flag (the glob, so a new command cannot slip past).
CLI_SCRIPTS = ("train.py", "sample.py", "gptjax/hf/convert.py", "gptjax/eval/perplexity.py",
               "gptjax/serve/app.py", "gptjax/eval/fewshot.py", "gptjax/plot.py", "gptjax/sweep.py",
               "gptjax/bench/cli.py")
CLI_GLOBS = ("gptjax/**/*.py",)

KEY_RE = r"[a-z]+\.[a-z0-9_]+"


def help_keys() -> set[str]:
    """The `section.key` names `python train.py --help` prints: its epilog has one line
    `  section.key=DEFAULT  (TYPE)` per key (gptjax.config.override_help)."""
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    keys = set(re.findall(rf"^\s+({KEY_RE})=\S*\s+\(\w+\)$", r.stdout, re.M))
    assert len(keys) > 10, f"no config keys found in train.py --help:\n{r.stdout}"
    return keys


def reference_keys(text: str) -> set[str]:
    """Keys of the config reference: table rows whose first cell is `section.key`."""
    return set(re.findall(rf"^\|\s*`({KEY_RE})`\s*\|", text, re.M))


@pytest.mark.slow
def test_config_reference_lists_exactly_the_help_keys() -> None:
    documented = reference_keys((DOCS / "config.md").read_text(encoding="utf-8"))
    printed = help_keys()
    missing = sorted(printed - documented)
    extra = sorted(documented - printed)
    assert not missing, f"config keys missing from docs/config.md: {missing}"
    assert not extra, f"docs/config.md lists keys train.py --help does not print: {extra}"


def flags_in(path: Path) -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', path.read_text(encoding="utf-8")))


def test_every_cli_flag_is_documented() -> None:
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))
    flags = {ROOT / s: flags_in(ROOT / s) for s in CLI_SCRIPTS}
    for path, found in flags.items():
        assert found, f"no flags found in {path.relative_to(ROOT)}"
    bench = {p: flags_in(p) for pattern in CLI_GLOBS for p in sorted(ROOT.glob(pattern))}
    assert any(bench.values()), f"no CLI flags found in {CLI_GLOBS}"
    undocumented = [
        f"{path.relative_to(ROOT)} {flag}"
        for path, found in {**flags, **bench}.items()
        for flag in sorted(found)
        # In backticks, and not merely the start of a longer flag (--batch vs --batch-sizes).
        if not re.search(rf"`{re.escape(flag)}(?![\w-])", docs)
    ]
    assert not undocumented, f"CLI flags missing from docs/*.md: {undocumented}"


def test_readme_is_short_and_keeps_the_quickstart() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text) <= README_MAX_CHARS, (
        f"README.md has {len(text):,} characters (at most {README_MAX_CHARS:,}): move detail "
        "into docs/")
    for command in ("make demo", "make test"):
        assert command in text, f"README.md lost `{command}`"


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def links(text: str) -> list[str]:
    """Targets of [text](target) links outside code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", text)


def relative_links(path: Path) -> list[str]:
    return [t for t in links(path.read_text(encoding="utf-8"))
            if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_relative_links_point_to_files_that_exist() -> None:
    broken = []
    for path in markdown_files():
        for target in relative_links(path):
            file = target.split("#", 1)[0]
            if not (path.parent / file).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_link_anchors_name_headings() -> None:
    broken = []
    for path in markdown_files():
        for target in links(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or "#" not in target:
                continue
            file, anchor = target.split("#", 1)
            dest = (path.parent / file) if file else path
            if dest.suffix == ".md" and dest.exists() and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"links to headings that do not exist: {broken}"
