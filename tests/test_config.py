import dataclasses
import math
from pathlib import Path

import pytest

from gptjax import config, model
from gptjax.errors import ConfigError

CONFIGS = sorted(Path(config.load.PRESET_DIR).glob("*.yaml"))
PAPER_PARAMS = {  # Brown et al. 2020, Table 2.1
    "small": 125e6, "medium": 350e6, "large": 760e6, "xl": 1.3e9,
    "2.7b": 2.7e9, "6.7b": 6.7e9, "13b": 13e9, "175b": 175e9,
}


def test_all_presets_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {f"gpt3-{n}" for n in PAPER_PARAMS} | {"default"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads(path: Path) -> None:
    cfg = config.load_config(path)
    assert cfg.model.d_model % cfg.model.n_head == 0
    assert config.load_config(path.stem) == cfg


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name: str) -> None:
    cfg = config.model_config(f"gpt3-{name}")
    n = model.count_params(cfg)  # through eval_shape: no memory
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, (name, n)
    assert cfg.context_length == 2048 and cfg.vocab_size == 50257
    assert cfg.padded_vocab_size == 50304
    assert cfg.d_ff == 4 * cfg.d_model
    assert cfg.attention_pattern == ("dense", "local") and cfg.local_window == 256


def test_presets_follow_table_and_appendix_b() -> None:
    c = config.load_config("gpt3-175b")
    assert (c.model.n_layer, c.model.d_model, c.model.n_head, c.model.head_dim) == (96, 12288, 96, 128)
    assert c.optim.learning_rate == pytest.approx(0.6e-4)
    assert (c.optim.beta1, c.optim.beta2, c.optim.eps) == (0.9, 0.95, 1e-8)
    assert (c.optim.clip_norm, c.optim.weight_decay) == (1.0, 0.1)
    assert c.optim.warmup_tokens == 375_000_000 and c.optim.decay_tokens == 260_000_000_000
    assert c.optim.min_lr_ratio == 0.1 and c.optim.ramp_start_tokens == 32_768
    assert c.train.batch_size * 2048 == pytest.approx(3.2e6, rel=0.02)
    xl = config.load_config("gpt3-xl").model
    assert (xl.n_head, xl.head_dim) == (16, 128)  # see the note in the preset file
    assert config.load_config("gpt3-13b").model.d_model == 5120
    assert config.load_config("gpt3-small").train.batch_size * 2048 == 2**19


def test_overrides_are_typed() -> None:
    cfg = config.load_config("default", ["model.n_layer=3", "optim.learning_rate=1e-3",
                                         "model.attention_pattern=dense,local,local",
                                         "model.scan_layers=true", "optim.warmup_tokens=1e6"])
    assert cfg.model.n_layer == 3
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.model.attention_pattern == ("dense", "local", "local")
    assert cfg.model.scan_layers is True  # the default config is unrolled
    assert cfg.optim.warmup_tokens == 1_000_000


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.nope=1"], "unknown config key model.nope"),
        (["nosection.x=1"], "unknown config section"),
        (["model.n_layer"], "not of the form"),
        (["model.n_layer=two"], "model.n_layer: expected an integer"),
        (["model.n_layer=2.5"], "model.n_layer: expected an integer"),
        (["model.scan_layers=maybe"], "model.scan_layers: expected true or false"),
        (["model.n_head=3"], "model.n_head=3 does not divide model.d_model"),
        (["model.local_window=1000"], "model.local_window=1000 is larger than"),
        (["model.attention_pattern=dense,sparse"], "unknown kind 'sparse'"),
        (["model.n_layer=3"], "not a multiple of the attention_pattern"),
        (["model.dtype=float8"], "model.dtype"),
        (["model.remat=some"], "model.remat"),
        (["train.batch_size=0"], "train.batch_size must be positive"),
        (["train.microbatches=3"], "train.microbatches=3 does not divide"),
        (["data.stride=9999"], "data.stride=9999"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one"),
        (["sample.top_p=1.5"], "sample.top_p"),
        (["data.tokenizer=spm"], "data.tokenizer"),
        (["optim.ramp_tokens=1000"], "needs train.microbatches > 1"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load_config("default", overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config 'gpt3-huge'"):
        config.load_config("gpt3-huge")
    with pytest.raises(ConfigError, match="not found"):
        config.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  d_modle: 3\n")
    with pytest.raises(ConfigError, match="model.d_modle"):
        config.load_config(wrong)


def test_round_trip_through_dict() -> None:
    cfg = config.load_config("gpt3-xl")
    assert config.config_from_dict(config.config_to_dict(cfg)) == cfg


@pytest.mark.slow
def test_flops_per_token_palm_formula() -> None:
    """PaLM's 6N + 12·L·H·Q·T, each local layer's attention over its band (issue 18): the
    6 dense layers of gpt3-small see 2048 positions, the 6 local ones 256."""
    cfg = config.model_config("gpt3-small")
    n = model.count_params(cfg) - 2048 * 768
    assert model.flops_per_token(cfg) == pytest.approx(6 * n + 12 * 768 * (6 * 2048 + 6 * 256))
    assert math.isclose(model.flops_per_token(cfg) / 1e9, 0.869, rel_tol=0.01)
    dense = dataclasses.replace(cfg, attention_pattern=("dense",))
    assert model.flops_per_token(dense) == pytest.approx(6 * n + 12 * 12 * 768 * 2048)
    # Recomputation: dots redoes the attention matmuls, full the whole forward pass.
    attn = 4 * 768 * (6 * 2048 + 6 * 256)
    assert model.hardware_flops_per_token(cfg) == model.flops_per_token(cfg)
    assert model.hardware_flops_per_token(dataclasses.replace(cfg, remat="dots")) == \
        pytest.approx(model.flops_per_token(cfg) + attn)
    assert model.hardware_flops_per_token(dataclasses.replace(cfg, remat="full")) == \
        pytest.approx(model.flops_per_token(cfg) + 2 * n + attn)

