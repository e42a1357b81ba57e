"""Results are data: every row of results/ carries its provenance, and the tables in
docs/performance.md are exactly what gptjax/bench/report.py makes from those files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptjax.bench import cli as bench
from gptjax.bench import report

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = ("date", "commit", "dirty", "device", "backend", "versions", "xla_flags", "command")


def test_every_result_row_has_its_provenance() -> None:
    """Each row carries it; a sweep recorded before the sweep did (results/sweep-cpu) has
    one provenance.json beside its points."""
    files = sorted((ROOT / "results").glob("**/*.jsonl"))
    assert len(files) >= 4
    for path in files:
        beside = path.parent / "provenance.json"
        for line in path.read_text().splitlines():
            row = json.loads(line)
            p = row["provenance"] if "provenance" in row else json.loads(beside.read_text())
            # dirty may be None: unknown for rows recorded by hand before --record existed.
            assert all(p.get(k) is not None for k in PROVENANCE if k != "dirty"), (path, p)
            assert p["command"].startswith(("python -m gptjax.", "python train.py"))


def test_docs_tables_match_the_results_files() -> None:
    doc = report.DOC.read_text()
    assert "<!-- results:cpu-train -->" in doc
    assert "<!-- results:sweep-cpu -->" in (ROOT / "docs" / "sweep.md").read_text()
    for path in report.DOCS:
        doc = path.read_text()
        assert report.render(doc) == doc, f"{path}: run python -m gptjax.bench.report"
    assert report.main(["--check"]) == 0


def test_a_changed_result_changes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = (report.RESULTS / "cpu.jsonl").read_text().splitlines()
    first = json.loads(next(r for r in rows if " train " in json.loads(r)["provenance"]["command"]))
    first["tokens_per_s"] = 123456789.0
    (tmp_path / "cpu.jsonl").write_text(json.dumps(first) + "\n")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    table = report.table("cpu-train")
    assert "123,456,789" in table
    assert report.render(report.DOC.read_text()) != report.DOC.read_text()


def test_record_appends_a_result_with_provenance(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    args = ["attention", "--seqs", "32,64", "--window", "16", "--heads", "2", "--head-dim", "8",
            "--repeats", "1", "--json", "--record", str(out)]
    assert bench.main(args) == 0
    assert bench.main(args) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 2 and [r["T"] for r in rows[0]["rows"]] == [32, 64]
    p = rows[0]["provenance"]
    assert p["command"] == "python -m gptjax.bench " + " ".join(args)
    assert len(p["commit"]) == 40 and p["versions"]["jax"] and p["backend"] == "cpu"


def test_only_changes_outside_the_results_files_make_a_tree_dirty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording a result edits results/: the next run's row must not say dirty for it."""
    import subprocess

    from gptjax.bench import provenance

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "results").mkdir(parents=True)
    (tmp_path / "results" / "cpu.jsonl").write_text("{}\n")
    (tmp_path / "train.py").write_text("pass\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert provenance.provenance([])["dirty"] is False
    (tmp_path / "results" / "cpu.jsonl").write_text("{}\n{}\n")
    assert provenance.provenance([])["dirty"] is False
    (tmp_path / "train.py").write_text("pass  # changed\n")
    assert provenance.provenance([])["dirty"] is True
