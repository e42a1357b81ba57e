"""LoRA: adapters over a frozen base. The model with zero B is the base exactly; merged equals
unmerged; a train step changes only the adapters and never the base; a LoRA run resumes
bitwise; a LoRA run directory is read directly by the tools and by `python -m gptjax.lora merge`;
changed adapters or a changed base on resume are one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import call_main, copy_run, loop_overrides, script, tiny, write_run

from gptjax import checkpoint, config, model, sharding
from gptjax.config import Config
from gptjax.errors import ConfigError
from gptjax.lora import adapters, merge, runs
from gptjax.train import optim, state as train_state, trainer

ALL = ("qkv", "out", "fc", "proj")


def _random_b(ad: object, seed: int = 3, std: float = 0.2) -> object:
    """Adapters with B drawn at random (fresh ones have B = 0: no change to compare)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: std * jax.random.normal(next(keys), x.shape)
        if p[-1].key.endswith("_b") else x, ad)


@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_is_the_base_and_merged_equals_unmerged(scan: bool) -> None:
    cfg = tiny(scan_layers=scan)
    base = model.init_params(cfg, jax.random.key(0))
    spec = adapters.LoraSpec(rank=4, alpha=8.0, targets=ALL)
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    plain = model.GPT(cfg).apply({"params": base}, tokens)

    fresh = adapters.init(jax.random.key(2), base, spec)
    assert jax.tree.leaves(fresh)  # every target of every layer has an A and a B
    fresh_logits = model.GPT(cfg).apply(model.variables(adapters.attach(base, fresh, spec)), tokens)
    np.testing.assert_array_equal(np.asarray(fresh_logits), np.asarray(plain))

    ad = _random_b(fresh)
    unmerged = model.GPT(cfg).apply(model.variables(adapters.attach(base, ad, spec)), tokens)
    merged = model.GPT(cfg).apply({"params": adapters.merge(adapters.attach(base, ad, spec))},
                                  tokens)
    assert float(jnp.abs(unmerged - plain).max()) > 0.1  # the adapters do change the model
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=1e-5, atol=1e-5)

    # Per-row adapters (the server's bank): row 0 the adapter, row 1 the base.
    bank = adapters.bank([adapters.scaled(ad, spec)])
    ids = jnp.array([1, 0])
    rows = jax.tree.map(lambda x: jnp.moveaxis(x[ids], 0, 1) if scan else x[ids], bank)
    mixed = model.GPT(cfg).apply({"params": base, "lora": rows}, tokens)
    np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(unmerged[0]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mixed[1]), np.asarray(plain[1]))


def _steps(mesh_shape: dict[str, int], n: int = 4, remat: str = "none"
           ) -> tuple[object, object, object, object]:
    """(base before, base after, adapters at step 0, after n steps) of LoRA train steps on a
    mesh of these sizes, dropout and two microbatches included."""
    cfg = config.config_from_dict({
        "model": dataclasses.asdict(tiny(scan_layers=True, remat=remat)), "mesh": mesh_shape,
        "train": {"lora_rank": 4, "lora_targets": list(ALL), "lora_dropout": 0.1,
                  "init_from": "/base", "batch_size": 8, "microbatches": 2}})
    n_dev = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["tensor"]
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_dev])
    tx = optim.make_optimizer(cfg.optim)
    spec = adapters.LoraSpec.of(cfg.train)
    plain = model.init_params(cfg.model, jax.random.key(0))  # outside the mesh: batch 1
    with sharding.activate(mesh):
        _, sh = train_state.abstract_state(cfg, mesh, tx)
        base_abs = train_state.abstract_params(cfg, mesh)[0]
        base = jax.device_put(plain, jax.tree.map(lambda a: a.sharding, base_abs))
        before = jax.tree.map(np.array, base)
        state = train_state.init_state(cfg, mesh, tx, sh)
        adapters0 = jax.tree.map(np.array, state.params)
        # Optimizer state for the adapters only: Adam's two moments of each, and counters.
        n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
        assert 2 * adapters.count(state.params) <= n_opt <= 2 * adapters.count(state.params) + 8
        step = train_state.jit_train_step(cfg.model, tx, mesh, sh, spec,
                                          jax.tree.map(lambda a: a.sharding, base_abs))
        rng = np.random.default_rng(0)
        T = cfg.model.context_length
        for _ in range(n):
            toks = rng.integers(0, cfg.model.vocab_size, (2, 4, T + 1))
            batch = {"inputs": toks[..., :-1].astype(np.int32),
                     "targets": toks[..., 1:].astype(np.int32),
                     "mask": np.ones((2, 4, T), np.float32)}
            state, metrics = step(state, sharding.to_global(batch, mesh, stacked=True),
                                  jnp.float32(1e-2), base)
            assert not bool(metrics["skipped"])
    return before, base, adapters0, jax.tree.map(np.array, state.params)


def test_train_step_changes_only_the_adapters() -> None:
    before, base, adapters0, trained = _steps({"data": 1, "fsdp": 1, "tensor": 1}, n=5)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base: bitwise unchanged
    for path, a in jax.tree_util.tree_leaves_with_path(adapters0):
        assert not np.array_equal(a, _at(trained, path)), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_lora_steps_on_a_mesh_equal_one_device() -> None:
    """Adapters sharded as their base kernels (data 2 x fsdp 2 x tensor 2), under remat, train
    as on one device without, up to reduction order."""
    one = _steps({"data": 1, "fsdp": 1, "tensor": 1})[3]
    eight = _steps({"data": 2, "fsdp": 2, "tensor": 2}, remat="full")[3]
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _at(tree: object, path: tuple) -> object:
    for k in path:
        tree = tree[k.key]
    return tree


# --------------------------------------------------------------------------- runs


def _lora_cfg(corpus: Path, run_dir: Path, base: Path, steps: int, **extra: object) -> Config:
    kv = {"train.init_from": base, "train.lora_rank": 4, "train.lora_targets": "qkv,out,fc,proj",
          "train.lora_dropout": 0.1, "train.checkpoint_every": 4, "train.eval_every": 100,
          "train.microbatches": 2, "optim.learning_rate": 1e-2, **extra}
    return config.load_config("default", loop_overrides(corpus, run_dir, steps=steps, **kv))


def _train(cfg: Config) -> dict:
    return trainer.train(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)


@pytest.fixture(scope="module")
def lora_run(trained_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path, Path]:
    """(corpus, base run, LoRA run of 8 steps over it, trained without a break)."""
    corpus, base = trained_run
    run = tmp_path_factory.mktemp("lora") / "run"
    _train(_lora_cfg(corpus, run, base, 8))
    return corpus, base, run


@pytest.mark.slow
def test_lora_run_is_small_and_resumes_bitwise(lora_run: tuple[Path, Path, Path],
                                               tmp_path: Path) -> None:
    corpus, base, ref = lora_run
    _, meta = checkpoint.read_meta(ref)
    assert meta[runs.BASE_KEY]["path"] == str(base) and meta[runs.BASE_KEY]["step"] == 24
    size = lambda d: sum(f.stat().st_size for f in (d / "checkpoints").rglob("*") if f.is_file())  # noqa: E731
    assert size(ref) / 3 < size(base) / 3 / 4  # per checkpoint: adapters, not the model

    split = tmp_path / "split"
    _train(_lora_cfg(corpus, split, base, 4))
    summary = _train(_lora_cfg(corpus, split, base, 8))
    assert summary["start_step"] == 4
    a, b = runs.read_adapters(ref)[0], runs.read_adapters(split)[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert losses(split)[-1] == losses(ref)[-1]


@pytest.mark.slow
def test_tools_read_a_lora_run_and_merge_folds_it(lora_run: tuple[Path, Path, Path],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    corpus, base, run = lora_run
    params, cfg, _, step = runs.load_model(run)
    assert step == 8 and "lora" in params
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % cfg.model.vocab_size
    unmerged = model.GPT(cfg.model).apply(model.variables(params), tokens)
    base_logits = model.GPT(cfg.model).apply({"params": checkpoint.load_params(base)[0]}, tokens)
    assert float(jnp.abs(unmerged - base_logits).max()) > 1e-3  # the run learned something

    code, out, err = call_main(merge.main, ["merge", str(run), "--out", str(tmp_path / "m")],
                               capsys)
    assert code == 0, err
    merged, mcfg, _, mstep = checkpoint.load_params(tmp_path / "m")
    assert mstep == 8 and mcfg.train.lora_rank == 0 and "lora" not in merged
    logits = model.GPT(mcfg.model).apply({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(unmerged), rtol=1e-5, atol=1e-5)

    # sample.py reads the LoRA run directly: greedy text equal to the merged run's.
    sample = script("sample").main
    argv = ["--prompt", "def ", "--max-new-tokens", "24", "--temperature", "0"]
    code, a, err = call_main(sample, ["--checkpoint", str(run), *argv], capsys)
    assert code == 0, err
    code, b, err = call_main(sample, ["--checkpoint", str(tmp_path / "m"), *argv], capsys)
    assert code == 0 and a == b and len(a) > 4

    code, _, err = call_main(merge.main, ["merge", str(base), "--out", str(tmp_path / "x")],
                             capsys)
    assert code == 2 and "not a LoRA run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_changed_adapters_or_base_on_resume_are_one_line(
        lora_run: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import train_in_process

    corpus, base, run = lora_run
    mine = copy_run(run, tmp_path / "run")
    base_args = lambda **kw: [  # noqa: E731
        *loop_overrides(corpus, mine, steps=12), f"train.init_from={base}",
        "train.lora_targets=qkv,out,fc,proj", *[f"{k}={v}" for k, v in kw.items()]]
    for change, needle in (({"train.lora_rank": 8}, "train.lora_rank: 4 in the run, 8 now"),
                           ({"train.lora_rank": 0}, "train.lora_rank: 4 in the run, 0 now")):
        code, err = train_in_process(base_args(**change), monkeypatch, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err

    # A base that changed under the run: same path and step, other weights.
    cfg = config.config_from_dict(checkpoint.read_meta(base)[1]["config"])
    fake = write_run(tmp_path / "base", cfg, model.init_params(cfg.model, jax.random.key(9)),
                     step=24)
    mine2 = copy_run(run, tmp_path / "run2")
    args = [*loop_overrides(corpus, mine2, steps=12), f"train.init_from={fake}",
            "train.lora_rank=4", "train.lora_targets=qkv,out,fc,proj"]
    code, err = train_in_process(args, monkeypatch, capsys)
    assert code == 2 and "changed since the adapters were trained" in err, err
    assert len(err.strip().splitlines()) == 1


def test_lora_config_refusals() -> None:
    with pytest.raises(ConfigError, match="set train.init_from"):
        config.load_config("default", ["train.lora_rank=4"])
    with pytest.raises(ConfigError, match="lora_targets='mlp' is not one of"):
        config.load_config("default", ["train.lora_rank=4", "train.init_from=x",
                                       "train.lora_targets=qkv,mlp"])
    with pytest.raises(ConfigError, match="lora_dropout must be in"):
        config.load_config("default", ["train.lora_dropout=1.0"])
