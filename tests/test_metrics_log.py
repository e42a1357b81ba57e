"""MetricsLog writes through etils.epath: checked on a local path, in both of its write modes
(append, and whole-file rewrite as on an object store, which cannot append)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptjax.train.progress import MetricsLog


@pytest.mark.parametrize("remote", [False, True])
def test_resume_drops_recomputed_steps_and_appends(tmp_path: Path, remote: bool) -> None:
    run_dir = str(tmp_path / "run")
    log = MetricsLog(run_dir, resume_step=0)
    log.remote = remote  # as for a gs:// run directory
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    path = Path(run_dir) / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a line cut short by a kill
    log = MetricsLog(run_dir, resume_step=2)
    log.remote = remote
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3]
