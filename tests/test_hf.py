"""GPT-2 import/export against transformers' PyTorch GPT2LMHeadModel (a small random model saved
here: nothing is downloaded), the CLI's one-line errors, train.init_from=HF_DIR, and few-shot
prompting through sample.py on an imported model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

# The hf extra (torch CPU, transformers, safetensors): `make test` installs it, so these tests
# always run there; a broken install fails here rather than skipping.
import safetensors.numpy as safetensors_numpy
import torch
import transformers

from gptjax import checkpoint, model
from gptjax.lora import runs as lora_runs
from gptjax.hf import convert, gpt2
from gptjax.errors import UserError
from helpers import needs_bpe, run_main, script

ROOT = Path(__file__).resolve().parent.parent
CTX = 32
FEW_SHOT_CTX = 256  # the byte-level few-shot prompt is ~230 tokens
FEW_SHOT = (
    "description: add two numbers => code: def add(a, b): return a + b\n"
    "description: square a number => code: def square(x): return x * x\n"
    "description: negate a number => code: def neg(x): return -x\n"
    "description: double a number => code:"
)


def make_hf(d: Path, vocab: int = 257, seed: int = 0, ctx: int = CTX, **kw: object) -> Path:
    """A random GPT-2 saved with save_pretrained; LayerNorms and biases randomized too, so the
    parity test sees every tensor."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=32, n_layer=3,
                                  n_head=4, bos_token_id=vocab - 1, eos_token_id=vocab - 1, **kw)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(d)
    return d


def torch_logits(hf_dir: Path, tokens: np.ndarray) -> np.ndarray:
    m = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return m(torch.from_numpy(tokens).long()).logits.numpy()


def run_cli(*args: str, module: str = "gptjax.hf") -> subprocess.CompletedProcess:
    """`python -m gptjax.hf ARGS` (or sample.py ARGS) as its main in this process; the process
    itself is tested once, in test_bad_input."""
    main = script("sample").main if module == "sample.py" else convert.main
    return run_main(main, list(args), module)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 257, (2, CTX), dtype=np.int32)


def test_import_matches_transformers(hf_dir: Path, tokens: np.ndarray) -> None:
    params, cfg = gpt2.load_gpt2(hf_dir)
    assert cfg.attention_pattern == ("dense",) and cfg.context_length == CTX
    assert cfg.vocab_size == 257 and cfg.d_ff == 128 and params["wte"].shape[0] == 384  # padded
    ours = np.asarray(model.GPT(cfg).apply({"params": params}, tokens))
    np.testing.assert_allclose(ours, torch_logits(hf_dir, tokens), atol=1e-4, rtol=0)


def test_export_loads_in_transformers_and_round_trips(hf_dir: Path, tokens: np.ndarray,
                                                       tmp_path: Path) -> None:
    params, cfg = gpt2.load_gpt2(hf_dir)
    out = gpt2.save_gpt2(params, cfg, tmp_path / "out", tokenizer="byte")
    m, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        theirs = m.eval()(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(theirs, torch_logits(hf_dir, tokens), atol=1e-5, rtol=0)
    # import -> export -> import is exact, in either parameter layout
    again, cfg2 = gpt2.load_gpt2(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, again, params)
    unscanned = dataclasses.replace(cfg, scan_layers=False)
    tensors = gpt2.read_hf_tensors(out, cfg)
    flat = gpt2.params_from_hf(tensors, unscanned)
    assert "layers_2" in flat and "layers" not in flat
    back = gpt2.params_to_hf(flat, unscanned)
    for k, v in back.items():
        np.testing.assert_array_equal(v, tensors[k.removeprefix("transformer.")])
    with pytest.raises(UserError, match="already holds a model"):
        gpt2.save_gpt2(params, cfg, out)


def test_cli_import_export_exact(hf_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli("import", str(hf_dir), "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "tokenizer byte" in r.stdout and (run / "config.yaml").is_file()
    params, cfg, meta, step = checkpoint.load_params(run)
    assert step == 0 and meta["tokenizer"] == "byte" and cfg.model.attention_pattern == ("dense",)
    r = run_cli("export", str(run), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    load = safetensors_numpy.load_file
    src, back = load(hf_dir / gpt2.WEIGHTS_FILE), load(tmp_path / "back" / gpt2.WEIGHTS_FILE)
    assert set(back) == set(src)
    for k in src:
        np.testing.assert_array_equal(back[k], src[k])
    r = run_cli("import", str(hf_dir), "--out", str(run))  # never over an existing run
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr


def _break(src: Path, dst: Path, how: str) -> Path:
    dst.mkdir()
    cfg = json.loads((src / gpt2.CONFIG_FILE).read_text())
    if how == "missing weights":
        (dst / "pytorch_model.bin").write_bytes(b"")
    else:
        (dst / gpt2.WEIGHTS_FILE).write_bytes((src / gpt2.WEIGHTS_FILE).read_bytes())
    if how == "gpt-neo":
        cfg.update(model_type="gpt_neo", architectures=["GPTNeoForCausalLM"])
    if how == "shapes":
        cfg["n_positions"] = 64
    if how == "missing config":
        return dst
    (dst / gpt2.CONFIG_FILE).write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("how,expect", [
    ("missing config", "has no config.json"),
    ("missing weights", "has no model.safetensors (it has pytorch_model.bin"),
    ("gpt-neo", "model_type is 'gpt_neo' (GPTNeoForCausalLM), not 'gpt2'"),
    ("shapes", "tensor wpe.weight has shape (32, 32) but config.json implies (64, 32)"),
])
def test_cli_bad_directories_one_line(hf_dir: Path, tmp_path: Path, how: str, expect: str) -> None:
    bad = _break(hf_dir, tmp_path / "bad", how)
    r = run_cli("import", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gptjax.hf: error: "), r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_local_layers_do_not_export(tmp_path: Path) -> None:
    cfg = dataclasses.replace(gpt2.model_config_from_hf(gpt2.HF_DEFAULTS),
                              attention_pattern=("dense", "local"))
    with pytest.raises(UserError, match="banded"):
        gpt2.hf_config_from_model(cfg)


def test_init_from_hf_dir(hf_dir: Path) -> None:
    """train.init_from=HF_DIR: converted into the fine-tuning config's layout and placement,
    with a one-line error naming the field that differs."""
    from gptjax.config import config_from_dict

    params, hcfg = gpt2.load_gpt2(hf_dir)
    base = {"vocab_size": 257, "context_length": CTX, "n_layer": 3, "d_model": 32, "n_head": 4,
            "d_ff": 128, "attention_pattern": ["dense"]}

    def init(**kw: object) -> object:
        cfg = config_from_dict({"model": {**base, **kw}})
        abstract = jax.eval_shape(lambda k: model.init_params(cfg.model, k), jax.random.key(0))
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                                abstract)
        return lora_runs.load_weights(str(hf_dir), cfg, abstract)[0]

    got = init(vocab_multiple=64, scan_layers=False)
    assert got["wte"].shape == (320, 32)
    np.testing.assert_array_equal(got["wte"][:257], params["wte"][:257])
    np.testing.assert_array_equal(got["layers_1"]["block0"]["mlp"]["fc_kernel"],
                                  params["layers"]["block0"]["mlp"]["fc_kernel"][1])
    with pytest.raises(UserError, match=r"model.n_layer is 3 there but 6 in this config"):
        init(n_layer=6)
    with pytest.raises(UserError, match="attention_pattern=dense,dense,local; set"):
        init(attention_pattern=["dense", "dense", "local"], local_window=8)


def _few_shot(hf_dir: Path, tmp_path: Path, tokenizer: str) -> None:
    """sample.py --prompt-file with few-shot examples on an imported GPT-2: greedy tokens equal
    transformers' greedy generate on the same weights."""
    from gptjax.tokenizer import get_tokenizer

    run = tmp_path / "run"
    r = run_cli("import", str(hf_dir), "--out", str(run), "--tokenizer", tokenizer)
    assert r.returncode == 0, r.stderr
    tok = get_tokenizer(tokenizer)
    prompt, new = FEW_SHOT, 24
    ids = tok.encode(prompt)
    (tmp_path / "prompt.txt").write_text(prompt)
    r = run_cli("--checkpoint", str(run), "--prompt-file", str(tmp_path / "prompt.txt"),
                "--greedy", "--max-new-tokens", str(new), "--json", module="sample.py")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["tokenizer"] == tokenizer and rec["prompt"] == prompt
    m = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                         eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)[0, len(ids):].tolist()
    if tok.eot_id in out:
        out = out[: out.index(tok.eot_id)]
    assert out and rec["samples"][0]["text"] == tok.decode(out)
    assert rec["samples"][0]["tokens"] == len(out)


@pytest.mark.slow
def test_few_shot_prompt_file_byte(tmp_path: Path) -> None:
    _few_shot(make_hf(tmp_path / "byte", ctx=FEW_SHOT_CTX), tmp_path, "byte")


@pytest.mark.slow
@needs_bpe
def test_few_shot_prompt_file_gpt2(tmp_path: Path) -> None:
    _few_shot(make_hf(tmp_path / "gpt2", vocab=50257, seed=1, ctx=FEW_SHOT_CTX), tmp_path, "gpt2")


def test_import_vocab_without_tokenizer_warns(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    src = make_hf(tmp_path / "small", vocab=101)
    cfg = convert.import_run(src, tmp_path / "run")
    assert cfg.data.tokenizer == "byte" and cfg.model.vocab_size == 101
    assert "byte tokenizer has 257 ids but the model's vocabulary is 101" in capsys.readouterr().err
    assert checkpoint.read_meta(tmp_path / "run")[0] == 0
