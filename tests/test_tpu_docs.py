"""Every `python train.py …` command in docs/tpu.md is one the project takes: each goes through
train.py's real argument parser and gptjax.config.load_config (nothing trains)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import train
from gptjax.aot import topology
from gptjax.config import load_config

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "tpu.md"


def guide_commands() -> list[str]:
    """The arguments after each `python train.py` in the guide's code blocks, also inside a
    quoted `--command='…'` of gcloud (up to the closing quote)."""
    blocks = "\n".join(re.findall(r"^```sh\n(.*?)^```", GUIDE.read_text(), re.M | re.S))
    return [m.strip() for m in re.findall(r"python train\.py([^'\"\n]*)", blocks)]


def test_guide_has_the_commands_it_promises() -> None:
    cmds = guide_commands()
    assert len(cmds) >= 5, cmds
    assert any("--topology v5p-1024" in c and "gpt3-175b" in c for c in cmds)
    assert any("--chip" in c for c in cmds)
    assert any("mesh.tensor" in c and "--dry-run" not in c for c in cmds)


@pytest.mark.parametrize("args", guide_commands())
def test_guide_command_parses_and_loads(args: str) -> None:
    ns = train.parse_args(shlex.split(args))
    cfg = load_config(ns.config, ns.overrides)
    if ns.chip is not None:
        assert ns.chip in topology.TPU_CHIPS
    m = cfg.mesh
    if ns.topology is not None:  # the mesh uses exactly the slice's chips
        sizes = (m.data, m.fsdp, m.tensor)
        chips = topology.parse(ns.topology).n_chips
        known = abs(m.data * m.fsdp * m.tensor)
        assert chips % known == 0 if -1 in sizes else known == chips
    if -1 not in (m.data, m.fsdp, m.tensor):
        assert cfg.model.n_head % m.tensor == 0, "mesh.tensor must divide the heads"
        micro = cfg.train.batch_size // cfg.train.microbatches
        assert micro % (m.data * m.fsdp) == 0, "the microbatch must split over data × fsdp"
