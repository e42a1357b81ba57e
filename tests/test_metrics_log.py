"""MetricsLog writes through etils.epath: checked on a local path, in both of its write modes
(append, and whole-file rewrite as on an object store, which cannot append); its TensorBoard
events come without torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gptjax.errors import refused
from gptjax.train import progress
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


def test_tensorboard_events_are_written_without_importing_torch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tensorboardX imports torch whenever it is installed (make install installs it); the run's
    writer keeps it out: seconds and hundreds of MB of every training process."""
    for name in list(sys.modules):
        if name == "torch" or name.startswith(("torch.", "tensorboardX")):
            monkeypatch.delitem(sys.modules, name)
    log = MetricsLog(str(tmp_path / "run"), resume_step=0)
    log.write({"step": 1, "loss": 2.5})
    log.close()
    assert "torch" not in sys.modules and "tensorboardX" in sys.modules
    assert [p.name[:20] for p in (tmp_path / "run" / "tb").iterdir()] == ["events.out.tfevents."]
    assert progress._summary_writer() is sys.modules["tensorboardX"].SummaryWriter


def test_a_refused_import_fails_only_inside_and_only_if_not_loaded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`refused` is how the writer keeps torch out; it must leave sys.modules as it found it."""
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # a small stdlib module
    with refused("colorsys"), pytest.raises(ImportError):
        import colorsys
    assert "colorsys" not in sys.modules
    import colorsys  # noqa: F401  # after it, the import works again
    with refused("json"):
        import json as again  # already loaded: refusing it would break its users
    assert again is json and sys.modules["json"] is json
