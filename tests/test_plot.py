"""python -m gptjax.plot: a PNG from a run's metrics.jsonl (written here, no training); bad input
is one line and exit code 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from gptjax import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header: the IHDR chunk comes first."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def write_run(d: Path, steps: int = 20, scale: float = 1.0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "val_loss": 5.5 * scale, "val_ppl": 245.0}]
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": scale * 5.5 / s**0.3, "lr": 1e-3 * min(1, s / 5),
                      "grad_norm": 1.0, "tokens": 256 * s, "microbatches": 1, "skipped": False})
        if s % 10 == 0:
            lines.append({"step": s, "val_loss": scale * 5.6 / s**0.3, "val_ppl": 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2')
    return d


def test_plot_of_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", steps=30, scale=0.9)
    curves = plot.read_metrics(a)
    assert len(curves.train) == 20 and len(curves.lr) == 20
    assert [t for t, _ in curves.val] == [0, 2560, 5120]  # validation at steps 0, 10, 20
    out = tmp_path / "plots" / "loss.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert png_size(out) == (900, 700)
    assert capsys.readouterr().out.strip() == f"wrote {out}"


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("no_metrics", "metrics.jsonl does not exist"),
    ("empty", "holds no training or validation loss"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, case: str,
                                      message: str) -> None:
    d = tmp_path / "run"
    if case != "missing":
        d.mkdir()
    if case == "empty":
        (d / "metrics.jsonl").write_text("")
    assert plot.main([str(d), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("python -m gptjax.plot: error: "), err
    assert message in err[0]
    assert not (tmp_path / "x.png").exists()
