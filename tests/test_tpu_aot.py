"""Programs compiled for real TPU slices on this CPU host: libtpu's XLA:TPU compiler, Mosaic
kernels included, ahead of time (the `tpu` extra installs libtpu; `make test` installs it)."""

from __future__ import annotations

import dataclasses
import types

import pytest
from helpers import tiny

import train
from gptjax.aot import memory, topology
from gptjax.config import Config, MeshConfig, OptimConfig, TrainConfig
from gptjax.errors import UserError
from gptjax.serve import dryrun as serve_dryrun
from gptjax.train import dryrun, plan


@pytest.mark.parametrize(("name", "chip", "jax_name", "chips"), [
    ("v5p-1024", "v5p", "v5p:8x8x8", 512),  # v5p and v4 types count TensorCores, 2 per chip
    ("v5p-8", "v5p", "v5p:2x2x1", 4),
    ("v5p-128", "v5p", "v5p:4x4x4", 64),
    ("v5litepod-16", "v5e", "v5e:4x4", 16),  # v5e and v6e types count chips
    ("v5litepod-8", "v5e", "v5e:2x4", 8),
    ("v5e-1", "v5e", "v5e:1x1", 1),
    ("v6e-256", "v6e", "v6e:16x16", 256),
    ("v6e-64", "v6e", "v6e:8x8", 64),
    ("v5e:2x2", "v5e", "v5e:2x2", 4),
    ("v5p:2x2x1", "v5p", "v5p:2x2x1", 4),
])
def test_slice_names_map_to_jax_topologies(name: str, chip: str, jax_name: str,
                                           chips: int) -> None:
    assert topology.parse(name) == topology.Slice(chip, jax_name, chips)


def test_v4_grids_follow_the_same_rule() -> None:
    """v4 is refused for compiles, but its accelerator types count cores as v5p's do."""
    assert topology.grid("v4", 16) == (2, 2, 4) and topology.grid("v4", 64) == (4, 4, 4)


@pytest.mark.parametrize(("name", "why"), [
    ("v5p-7", "no v5p slice of that size"), ("v5litepod-12", "no v5e slice of that size"),
    ("v9-8", "unknown TPU slice"), ("v5e:2x2x2", "2-D grid"), ("tpu", "unknown TPU slice"),
    ("v5p:2x2", "3-D grid"), ("v4-32", "v4 slices are not supported"),
])
def test_unknown_slices_are_refused(name: str, why: str) -> None:
    with pytest.raises(UserError, match=why):
        topology.parse(name)


def test_each_slice_size_is_what_libtpu_describes() -> None:
    """The mapped names are topologies libtpu knows, with the chips the mapping counts."""
    for name in ("v5litepod-8", "v5p-16", "v6e-16"):
        devices = topology.devices(name)
        assert len(devices) == topology.parse(name).n_chips
        assert {d.platform for d in devices} == {"tpu"}


def _cfg(batch_size: int = 8, **model: object) -> Config:
    m = tiny(**{"attention_impl": "auto", "context_length": 256, "local_window": 128, **model})
    return Config(model=m, mesh=MeshConfig(data=1, fsdp=4, tensor=1),
                  train=TrainConfig(batch_size=batch_size, microbatches=1, total_tokens=10**9),
                  optim=OptimConfig(ramp_tokens=0))


# v5p's compile in `make test` only: v5e's keeps a Mosaic compile in the fast tier.
@pytest.mark.parametrize("name", ["v5e:2x2", pytest.param("v5p:2x2x1", marks=pytest.mark.slow)])
def test_train_step_compiles_for_a_slice_with_mosaic_splash(name: str) -> None:
    cfg = _cfg()
    target = topology.parse(name)
    out = dryrun.dry_run(cfg, topology.slice_mesh(cfg.mesh, name), target=target)
    rec = out.record
    # Dense and local layers, forward and backward (dq, dkv): splash's real kernels, not the
    # interpret-mode emulation that a CPU target would get.
    assert rec["mosaic_calls"] >= 6, out.text
    assert rec["need_gib"] > 0 and rec["fits"] is True
    assert rec["need_gib"] == pytest.approx(rec["arguments_gib"] + rec["outputs_gib"]
                                            + rec["temporaries_gib"] - rec["aliases_gib"])
    assert f"{target.hbm_gib:g} GiB HBM): XLA needs" in out.text and "-> fits" in out.text
    assert f"{name}, 4 {target.chip} chips" in out.text


def test_the_same_step_on_cpu_runs_splash_in_interpret_mode() -> None:
    """The kernel follows the target: compiled for the CPU devices here, no Mosaic call."""
    from gptjax import sharding

    cfg = _cfg(attention_impl="splash")
    mesh = sharding.make_mesh(cfg.mesh, __import__("jax").devices()[:4])
    lines, rec = dryrun.compile_step(cfg, mesh, 1, 8, None)
    assert "mosaic_calls" not in rec and rec["need_gib"] > 0


@pytest.mark.slow  # two TPU compiles of 12-16 s
def test_remat_auto_is_resolved_against_the_chips_hbm(monkeypatch) -> None:
    """model.remat=auto on a slice keeps the least recomputation whose XLA figure fits the
    chip; with the chip's HBM shrunk below the no-remat need, a recomputing policy is chosen
    (8 sequences of 192 per chip: the saved activations outweigh the tiny weights; 256 took a
    third longer to compile)."""
    cfg = _cfg(batch_size=32, remat="none", context_length=192, local_window=96)
    name = "v5e:2x2"
    mesh = topology.slice_mesh(cfg.mesh, name)
    # Each policy's program is compiled once for the whole test (XLA:TPU is deterministic):
    # the three dry runs below choose among the same two compiled programs.
    compiled: dict[str, object] = {}
    compile_once = dryrun.compile_train_step

    def memo(model_cfg, *args):
        if model_cfg.remat not in compiled:
            compiled[model_cfg.remat] = compile_once(model_cfg, *args)
        return compiled[model_cfg.remat]

    monkeypatch.setattr(dryrun, "compile_train_step", memo)
    need_none = dryrun.dry_run(cfg, mesh, target=topology.parse(name)).record["need_gib"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="auto"))
    monkeypatch.setitem(topology.TPU_CHIPS, "v5e", (197e12, need_none * 0.99))
    out = dryrun.dry_run(cfg, mesh, target=topology.parse(name))
    rec = out.record
    assert rec["remat"] in ("dots", "full") and rec["remat_tried"]["none"] == need_none
    assert rec["need_gib"] <= need_none * 0.99 and rec["fits"] is True
    assert f"model.remat=auto: {rec['remat']}" in out.text
    # Where no policy fits (only "none" tried here, to keep the test short): one line says so,
    # with what each policy needed, and the chip line says it does not fit.
    monkeypatch.setattr(plan, "REMAT_TRY_ORDER", ("none",))
    out = dryrun.dry_run(cfg, mesh, target=topology.parse(name))
    assert out.record["fits"] is False and out.record["remat_tried"] == {"none": need_none}
    assert f"no remat policy fits 100% of the {need_none * 0.99:g} GiB HBM of a v5e chip" in out.text
    assert out.lines[-1].startswith("per chip (v5e") and out.lines[-1].endswith("does NOT fit")


def test_decode_step_compiles_for_a_slice() -> None:
    cfg = _cfg()
    target = topology.parse("v5e:2x2")
    mesh = topology.slice_mesh(MeshConfig(data=1, fsdp=1, tensor=4), "v5e:2x2")
    text, rec = serve_dryrun.dry_run(cfg.model, mesh, target, max_batch=8, steps_per_call=2)
    # 8 slots x (2 dense layers x 256 positions + 2 local layers' rings of 128) x (k, v) x 4
    # heads x 8 dims x 4 bytes, the heads split 4 ways; and the slots' 8 int32 positions.
    assert rec["kv_cache_gib"] * 2**30 == 8 * (2 * 256 + 2 * 128) * 2 * 4 * 8 * 4 / 4 + 8 * 4
    assert rec["decode"]["need_gib"] > 0 and rec["prefill"]["need_gib"] > 0
    assert rec["fits"] is True and "decode (2 steps of every slot" in text


def test_oom_message_gives_the_need() -> None:
    e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 40.51G of "
                     "15.75G hbm. Exceeded hbm capacity by 24.76G.")
    assert memory.out_of_memory(e) and memory.oom_need_gib(e) == pytest.approx(40.51)
    assert memory.oom_need_gib(RuntimeError("RESOURCE_EXHAUSTED: no figure")) is None


# ------------------------------------------------------------------ the command line


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = train.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_unknown_topology_is_one_line(capsys) -> None:
    code, _, err = _run(["--dry-run", "--topology", "v5p-7"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no v5p slice of that size" in err


def test_cli_mesh_that_does_not_match_the_slice_is_one_line(capsys) -> None:
    code, _, err = _run(["--dry-run", "--topology", "v5e:2x2", "mesh.data=1", "mesh.fsdp=8"],
                        capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the slice has 4 v5e chips" in err


def test_cli_microbatch_that_does_not_split_over_the_slice_is_one_line(capsys) -> None:
    code, _, err = _run(["--dry-run", "--topology", "v5e:2x2", "mesh.data=1", "mesh.fsdp=4",
                         "train.batch_size=6", "train.microbatches=1"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "a microbatch of 6 sequences does not split over 4 data-parallel devices" in err


def test_cli_missing_libtpu_names_the_install(monkeypatch, capsys) -> None:
    monkeypatch.setattr(topology.importlib.util, "find_spec",
                        lambda name: None if name == "libtpu" else types.SimpleNamespace())
    code, _, err = _run(["--dry-run", "--topology", "v5e:2x2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install -e '.[tpu]'" in err


def test_cli_topology_needs_dry_run(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--topology", "v5e:2x2"])
    assert e.value.code == 2 and "needs --dry-run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--dry-run", "--topology", "v5e:2x2", "--chip", "v5e"])
    assert e.value.code == 2 and "drop --chip" in capsys.readouterr().err


@pytest.mark.slow  # a TPU compile per preset
def test_estimate_is_within_a_quarter_of_xla_on_every_preset() -> None:
    """The dry run's own estimate, recomputed now for each plan of results/tpu-aot.jsonl (the
    presets on their slices, remat as chosen there), against XLA:TPU's figure recorded for the
    same plan: never more than 25% off."""
    import json
    from pathlib import Path

    from gptjax.config import load_config
    from gptjax.train import optim
    from gptjax.train.state import abstract_state

    rows = [json.loads(line) for line in
            (Path(__file__).resolve().parents[1] / "results" / "tpu-aot.jsonl").open()]
    rows = [r for r in rows if r.get("need_gib") and r.get("remat")]
    assert len({r["config"] for r in rows}) == 8, "every preset has a compiled plan"
    off = {}
    for r in rows:
        cfg = load_config(r["config"], [*r["overrides"], f"model.remat={r['remat']}"])
        mesh = topology.slice_mesh(cfg.mesh, r["slice"])
        abs_state, _ = abstract_state(cfg, mesh, optim.make_optimizer(cfg.optim))
        est = dryrun.estimate(cfg, mesh, abs_state, r["seqs_per_device"], r["microbatches"])
        off[f"{r['config']} on {r['slice']}"] = est["total"] / 2**30 / r["need_gib"] - 1
    assert all(abs(v) <= 0.25 for v in off.values()), off
