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
from helpers import call_main

from gptjax import config, model
from gptjax.hf import convert, gpt2
from gptjax.lora import adapters, runs
from gptjax.sharding import with_shardings

TOKENS = np.array([[3, 17, 42, 5, 9, 60, 1, 33, 28, 11, 7, 50]], np.int64)
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
    hf = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
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
    np.testing.assert_allclose(ours[..., :64], theirs, atol=1e-4, rtol=1e-4)

    # --merged: a plain GPT-2 with the adapters folded in.
    code, _, err = call_main(convert.main, ["export", str(lora_run), "--merged", "--out",
                                            str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(_hf_logits(merged), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_imports_as_a_lora_run(hf_base: Path, tmp_path: Path, rslora: bool,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(3)
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_base)
    pm = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["attn.c_attn", "mlp.c_fc"], fan_in_fan_out=True,
        use_rslora=rslora))
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
    assert "targets qkv,fc" in out
    np.testing.assert_allclose(_our_logits(tmp_path / "run")[..., :64], theirs, atol=1e-4,
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
