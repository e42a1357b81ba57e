"""LoRA adapters exchanged with Hugging Face PEFT, offline, on a tiny GPT-2: a gptjax LoRA run
exported loads in `PeftModel.from_pretrained` with the same logits; a PEFT adapter imported is
a LoRA run with PEFT's logits; a round trip keeps the adapters; what PEFT can say and gptjax
cannot is one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import call_main, write_corpus

from gptjax import config, model, sharding
from gptjax.hf import convert, gpt2
from gptjax.lora import adapters, runs
from gptjax.sharding import with_shardings
from gptjax.train import trainer

TOKENS = np.array([[3, 17, 42, 5, 9, 60, 1, 33, 28, 11, 7, 250]], np.int64)
V = 257  # the byte tokenizer's ids fit, so train.py can resume an imported run
ALL = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _hf_logits(m: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(TOKENS)).logits.numpy()


def _our_logits(run: Path) -> np.ndarray:
    params, cfg, _, _ = runs.load_model(run)
    out = model.GPT(cfg.model).apply(model.variables(params), jnp.asarray(TOKENS, jnp.int32))
    return np.asarray(out)


def _one_device(cfg: config.Config) -> object:
    shapes = model.param_shapes(cfg.model)
    return with_shardings(shapes, runs.one_device(shapes))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    hf = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                 bos_token_id=0, eos_token_id=0)
    d = tmp_path_factory.mktemp("peft") / "gpt2"
    transformers.GPT2LMHeadModel(hf).save_pretrained(d)
    return d


def _lora_cfg(hf_dir: Path, run: Path, **model_kw: object) -> config.Config:
    m = config.config_to_dict(config.Config(
        model=gpt2.model_config_from_hf(gpt2.read_hf_config(hf_dir))))["model"]
    m.update(model_kw)
    return config.config_from_dict({"model": m, "train": {
        "run_dir": str(run), "init_from": str(hf_dir), "lora_rank": 4, "lora_alpha": 8.0,
        "lora_targets": ["qkv", "out", "fc", "proj"]}})


@pytest.fixture(scope="module")
def lora_run(hf_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run over the tiny GPT-2 with random, non-zero adapters."""
    run = tmp_path_factory.mktemp("peft") / "run"
    cfg = _lora_cfg(hf_base, run)
    spec = adapters.LoraSpec.of(cfg.train)
    base, step = runs.load_weights(str(hf_base), cfg, _one_device(cfg))
    ad = adapters.init(jax.random.key(1), base, spec)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape)
        if p[-1].key.endswith("_b") else x, ad)
    runs.write_run(run, cfg, ad, 3, {runs.BASE_KEY: runs.base_reference(str(hf_base), step, base)})
    return run


def test_export_loads_in_peft_with_our_logits(hf_base: Path, lora_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ours = _our_logits(lora_run)
    code, out, err = call_main(convert.main, ["export", str(lora_run), "--out",
                                              str(tmp_path / "ad")], capsys)
    assert code == 0, err
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ALL and conf["r"] == 4 and conf["fan_in_fan_out"]
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_base)
    plain = _hf_logits(base)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    theirs = _hf_logits(pm)
    assert np.abs(theirs - plain).max() > 1e-2  # the adapters change the model
    np.testing.assert_allclose(ours[..., :V], theirs, atol=1e-4, rtol=1e-4)

    # --merged: a plain GPT-2 with the adapters folded in.
    code, _, err = call_main(convert.main, ["export", str(lora_run), "--merged", "--out",
                                            str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(_hf_logits(merged), theirs, atol=1e-4, rtol=1e-4)


# PEFT's own names for GPT-2 are bare ("c_attn"; "c_proj" is both c_proj), matched by suffix.
@pytest.mark.parametrize("rslora,modules,targets", [
    (False, ["attn.c_attn", "mlp.c_fc"], "qkv,fc"),
    (True, ["c_attn", "c_proj"], "qkv,out,proj")])
def test_peft_adapter_imports_as_a_lora_run(hf_base: Path, tmp_path: Path, rslora: bool,
                                            modules: list[str], targets: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(3)
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_base)
    pm = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, fan_in_fan_out=True, use_rslora=rslora))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    pm.eval()
    theirs = _hf_logits(pm)
    pm.save_pretrained(tmp_path / "ad")
    code, out, err = call_main(convert.main, ["import", str(tmp_path / "ad"), "--base",
                                              str(hf_base), "--out", str(tmp_path / "run")],
                               capsys)
    assert code == 0, err
    assert f"targets {targets}" in out
    np.testing.assert_allclose(_our_logits(tmp_path / "run")[..., :V], theirs, atol=1e-4,
                               rtol=1e-4)

    # Round trip: exported again and imported again, the same adapters.
    code, _, err = call_main(convert.main, ["export", str(tmp_path / "run"), "--out",
                                            str(tmp_path / "ad2")], capsys)
    assert code == 0, err
    code, _, err = call_main(convert.main, ["import", str(tmp_path / "ad2"), "--out",
                                            str(tmp_path / "run2")], capsys)
    assert code == 0, err  # --base from the adapter config's base_model_name_or_path
    a, b = runs.read_adapters(tmp_path / "run")[0], runs.read_adapters(tmp_path / "run2")[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_what_peft_says_and_we_cannot_is_one_line(hf_base: Path, lora_run: Path,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = call_main(convert.main, ["export", str(lora_run), "--out",
                                            str(tmp_path / "ad")], capsys)
    assert code == 0, err

    def refused(change: dict, needle: str) -> None:
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "ad", d)
        conf = json.loads((d / "adapter_config.json").read_text())
        conf.update(change)
        (d / "adapter_config.json").write_text(json.dumps(conf))
        code, _, err = call_main(convert.main, ["import", str(d), "--base", str(hf_base),
                                                "--out", str(tmp_path / "x")], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()

    refused({"use_dora": True}, "use_dora=True is not supported")
    refused({"target_modules": ["attn.c_attn", "lm_head"]}, "'lm_head' has no gptjax counterpart")
    refused({"peft_type": "IA3"}, "only LORA adapters load")
    refused({"r": 8}, "has lora_A (4, 32)")
    refused({"target_modules": ["h.0.attn.c_attn"]}, "in only some layers")
    refused({"alora_invocation_tokens": [5]}, "alora_invocation_tokens=[5] is not supported")
    refused({"init_lora_weights": "pissa"}, "changes the base's weights too")

    # A LoRA run over a model with banded layers has no GPT-2 (nor PEFT) counterpart.
    local = tmp_path / "local"
    cfg = _lora_cfg(hf_base, local, attention_pattern=["dense", "local"], local_window=8)
    ad = adapters.init(jax.random.key(0), model.param_shapes(cfg.model),
                       adapters.LoraSpec.of(cfg.train))
    runs.write_run(local, cfg, ad, 0, {runs.BASE_KEY: {"path": str(hf_base), "step": None,
                                                       "checksum": "0"}})
    code, _, err = call_main(convert.main, ["export", str(local), "--out",
                                            str(tmp_path / "y")], capsys)
    assert code == 2 and "banded (local) layers" in err, err
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_imported_run_resumes_in_train(hf_base: Path, lora_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """train.py takes an imported adapter as a LoRA run at step 0 and trains on from it."""
    code, _, err = call_main(convert.main, ["export", str(lora_run), "--out",
                                            str(tmp_path / "ad")], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = call_main(convert.main, ["import", str(tmp_path / "ad"), "--out", str(run)],
                             capsys)
    assert code == 0, err
    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus")
    # As the run's config.yaml says: train.py --config RUN/config.yaml data.source=...
    cfg = config.load_config(str(run / "config.yaml"), [
        f"data.source={corpus}/*.txt", f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.1", "train.steps=2", "train.batch_size=4", "train.log_every=1",
        "train.eval_every=100", "train.checkpoint_every=2", "mesh.data=1",
        "optim.learning_rate=1e-2"])
    summary = trainer.train(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), quiet=True)
    assert summary["start_step"] == 0
    before, after = runs.read_adapters(run, 0)[0], runs.read_adapters(run)
    assert after[3] == 2
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after[0])))


def test_bad_adapter_files_and_a_gptjax_base(hf_base: Path, lora_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = call_main(convert.main, ["export", str(lora_run), "--out",
                                            str(tmp_path / "ad")], capsys)
    assert code == 0, err
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    for damage, needle in [(lambda: weights.write_bytes(b"junk"), "not a readable safetensors"),
                           (weights.unlink, "has no adapter_model.safetensors")]:
        damage()
        code, _, err = call_main(convert.main, ["import", str(tmp_path / "ad"), "--base",
                                                str(hf_base), "--out", str(tmp_path / "x")],
                                 capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err

    # Over a gptjax run as base, export says to export that base too.
    code, _, err = call_main(convert.main, ["import", str(hf_base), "--out",
                                            str(tmp_path / "base")], capsys)
    assert code == 0, err
    run = tmp_path / "lora"
    cfg = _lora_cfg(hf_base, run)
    ad = adapters.init(jax.random.key(0), model.param_shapes(cfg.model),
                       adapters.LoraSpec.of(cfg.train))
    runs.write_run(run, cfg, ad, 0, {runs.BASE_KEY: {"path": str(tmp_path / "base"),
                                                     "step": 0, "checksum": "0"}})
    code, out, err = call_main(convert.main, ["export", str(run), "--out", str(tmp_path / "y")],
                               capsys)
    assert code == 0, err
    conf = json.loads((tmp_path / "y" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tmp_path / "base")
    assert f"python -m gptjax.hf export {tmp_path / 'base'} --out DIR" in out
