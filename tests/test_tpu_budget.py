"""TPU chips in the FLOPs table (MFU) and a dry run planned for a named TPU chip."""

from __future__ import annotations

import types

import jax
import pytest
from helpers import tiny

import train
from gptjax import sharding
from gptjax.train import dryrun, plan
from gptjax.config import Config, MeshConfig, TrainConfig


# The device_kind strings jax knows for each chip (jax/_src/pallas/mosaic/tpu_info.py).
@pytest.mark.parametrize(("kind", "tflops"), [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459), ("TPU v5p", 459),
    ("TPU v6 lite", 918), ("TPU v6e", 918), ("NVIDIA H100 80GB HBM3", 989),
])
def test_peak_flops_by_device_kind(monkeypatch, kind: str, tflops: int) -> None:
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    assert plan.device_peak_flops() == tflops * 1e12


def test_dry_run_for_a_named_chip_says_whether_it_fits() -> None:
    cfg = Config(model=tiny(), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
                 train=TrainConfig(batch_size=8, total_tokens=10**9))
    mesh = sharding.make_mesh(cfg.mesh)
    text = dryrun.dry_run(cfg, mesh, compile=False, chip="v5e").text
    assert "of 197 TFLOP/s" in text
    assert "per chip (v5e, 16 GiB HBM)" in text and "-> fits" in text
    assert "on 8 v5e chips:" in text and "chip-days" in text and "355 V100 GPU-years" in text


def test_chip_flag_takes_only_known_chips(capsys) -> None:
    assert train.parse_args(["--dry-run", "--chip", "v5p"]).chip == "v5p"
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--dry-run", "--chip", "v9"])
    assert e.value.code == 2
    assert "invalid choice: 'v9'" in capsys.readouterr().err
