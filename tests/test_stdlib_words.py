"""gptjax/bench/stdlib_words.py: the share of a sample's words that occur in the stdlib's
source, the figure the docs give for the demo's sample."""

import subprocess
import sys

import pytest

from gptjax.bench import stdlib_words


@pytest.fixture(scope="module")
def words():
    return stdlib_words


def test_share_of_known_words(words):
    known = words.stdlib_words()
    assert {"self", "assertEqual", "def", "return", "isinstance"} <= known
    assert words.known_share("self.assertEqual(x, 1)\n", known) == (1.0, 3, [])
    assert words.known_share("def zqxjvw(self): return qqzzkxy", known) == (
        pytest.approx(0.6), 5, ["qqzzkxy", "zqxjvw"])  # repeated words count each time:
    assert words.known_share("zqxjvw zqxjvw self", known)[0] == pytest.approx(1 / 3)
    assert words.known_share("", known) == (0.0, 0, [])


def test_command_line(tmp_path, capsys):
    sample = tmp_path / "s.txt"
    sample.write_text("import os\nxqzzyv = os.path\n")
    assert stdlib_words.main([str(sample)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("80% of the sample's 5 words") and "not: xqzzyv" in out
    # The module's own entry point (`python -m`), with a file it cannot read: one line, status 2.
    r = subprocess.run([sys.executable, "-m", "gptjax.bench.stdlib_words",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read" in r.stderr
