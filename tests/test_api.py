"""The public API as the README shows it."""

import jax
import jax.numpy as jnp

import gptjax
from helpers import tiny


def test_public_api_round_trip() -> None:
    cfg = gptjax.model_config("default")
    assert isinstance(cfg, gptjax.ModelConfig) and cfg.vocab_size == 257
    cfg = tiny(vocab_size=257)
    model = gptjax.GPT(cfg)
    tokens = jnp.zeros((1, 16), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)  # boxed with logical axis names
    logits = model.apply(variables, tokens)
    assert logits.shape == (1, 16, 257) and logits.dtype == jnp.float32
    tok = gptjax.get_tokenizer("byte")
    prompt = tok.encode("def ")
    # generate takes the params as init returns them (boxed) or plain; same tokens either way.
    boxed = gptjax.generate(variables["params"], cfg, [prompt], max_new_tokens=6, temperature=0.0)
    plain = gptjax.generate(gptjax.init_params(cfg, jax.random.key(0)), cfg, [prompt],
                            max_new_tokens=6, temperature=0.0)
    assert boxed == plain and len(boxed[0]) == 6
    assert isinstance(tok.decode(boxed[0]), str)
    assert set(gptjax.__all__) >= {"GPT", "model_config", "get_tokenizer", "generate"}


def test_readme_jit_example_runs() -> None:
    """The README's second Python block (the pure pieces under jax.jit) runs as printed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2 and "jax.jit(gptjax.train_step" in blocks[1]
    scope: dict = {}
    exec("import jax, jax.numpy as jnp\nimport gptjax\n" + blocks[1], scope)
    assert int(scope["state"].step) == 1 and bool(jnp.isfinite(scope["metrics"]["loss"]))
    assert float(scope["n"]) == 8 * 128 and scope["new"].shape == (2, 32)
    assert scope["kept"].tolist() == [32, 32]
    # Random tokens: the mean loss is near ln(vocab) before and after the one step.
    import math

    for mean in (float(scope["metrics"]["loss"]), float(scope["nll_sum"]) / float(scope["n"])):
        assert abs(mean - math.log(257)) < 1.0, mean
