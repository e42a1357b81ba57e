"""python -m gptjax.sweep: the fit recovers a known power law; a tiny sweep (2 sizes x 2 budgets,
minuscule models) writes points.jsonl, fit.json and the plot; rerunning it trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptjax import sweep
from helpers import write_corpus
from test_plot import png_size


@pytest.mark.parametrize("use_scipy", [False, True])
def test_fit_recovers_a_known_power_law(use_scipy: bool) -> None:
    a, b, c = 200.0, 0.15, 1.2
    C = np.geomspace(1e12, 1e16, 9)
    fit = sweep.fit_power_law(C.tolist(), (a * C**-b + c).tolist(), use_scipy=use_scipy)
    assert fit["b"] == pytest.approx(b, rel=0.02)
    assert fit["c"] == pytest.approx(c, rel=0.02)
    assert fit["a"] == pytest.approx(a, rel=0.3)  # a·C^-b is what is pinned: a moves with b
    pred = fit["a"] * C ** -fit["b"] + fit["c"]
    np.testing.assert_allclose(pred, a * C**-b + c, rtol=1e-3)
    assert ("scipy" in fit["method"]) == use_scipy


def test_frontier_and_size_syntax() -> None:
    pts = [{"budget": 1.0, "val_loss": 3.0}, {"budget": 1.0, "val_loss": 2.5},
           {"budget": 2.0, "val_loss": 2.7}, {"budget": 4.0, "val_loss": 2.0}]
    assert [p["val_loss"] for p in sweep.frontier(pts)] == [2.5, 2.0]
    assert [s.name for s in sweep.parse_sizes("2x64, 4X128")] == ["2x64", "4x128"]
    assert sweep.Size(4, 128).model_fields()["n_head"] == 2


def sweep_args(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        write_corpus(corpus)
    return ["--sizes", "2x16,2x32", "--budgets", "5e7,1.5e8", "--out", str(tmp_path / "sweep"),
            f"data.source={corpus}/*.txt", f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0.1", "model.context_length=32", "model.local_window=8",
            "train.batch_size=8", "train.eval_batches=1"]


@pytest.mark.slow
def test_tiny_sweep_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    assert sweep.main(sweep_args(tmp_path)) == 0
    out = tmp_path / "sweep"
    points = [json.loads(ln) for ln in (out / "points.jsonl").read_text().splitlines()]
    assert sorted((p["size"], p["budget"]) for p in points) == [
        ("2x16", 5e7), ("2x16", 1.5e8), ("2x32", 5e7), ("2x32", 1.5e8)]
    for p in points:
        assert p["flops"] == pytest.approx(p["budget"], rel=0.5) and p["steps"] >= 1
        assert np.isfinite(p["val_loss"]) and Path(p["run_dir"], "metrics.jsonl").exists()
    fit = json.loads((out / "fit.json").read_text())
    assert {"a", "b", "c", "method", "frontier"} <= set(fit)
    assert png_size(out / "sweep.png") == (800, 600)
    text = capsys.readouterr().out
    assert "budget 5e+07 FLOPs: best" in text and "budget 1.5e+08 FLOPs: best" in text

    def no_training(*args: object, **kw: object) -> None:
        raise AssertionError("a finished sweep trained again")

    monkeypatch.setattr(sweep, "train", no_training)
    before = (out / "points.jsonl").read_text()
    assert sweep.main(sweep_args(tmp_path)) == 0
    assert (out / "points.jsonl").read_text() == before


def test_bad_flags_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    for args in (["--sizes", "4by128"], ["--budgets", "-1"], ["--time-budget", "0"]):
        with pytest.raises(SystemExit) as e:
            sweep.main([*args, "--out", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("python -m gptjax.sweep: error: "), err


def test_a_stopped_point_is_not_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal stops train() with a checkpoint and preempted=True: the point is unfinished
    (its step-0 loss is no result), so the sweep stops instead of recording it."""
    from gptjax.config import load_config

    cfg = load_config("default", [f"train.run_dir={tmp_path / 'run'}", "train.steps=4"])
    monkeypatch.setattr(sweep, "train", lambda c, quiet: {
        "preempted": True, "start_step": 0, "val_losses": [(0, 5.5)]})
    with pytest.raises(KeyboardInterrupt):
        sweep.run_point(cfg, sweep.parse_sizes("2x64")[0], 1e12)
    # A finished run whose points.jsonl line was lost: its last logged validation loss counts.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "val_loss": 5.5}) + "\n" + json.dumps({"step": 4, "val_loss": 3.25})
        + "\n")
    monkeypatch.setattr(sweep, "train", lambda c, quiet: {"start_step": 4})
    assert sweep.run_point(cfg, sweep.parse_sizes("2x64")[0], 1e12)["val_loss"] == 3.25
