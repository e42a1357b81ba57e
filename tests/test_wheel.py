"""A wheel built from the repository works outside the checkout: the presets are package data, so
`model_config("gpt3-small")` needs no configs/ folder, and the public API jits from a fresh
interpreter. The process boundary (an interpreter that cannot see the source tree) is the point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import jax, jax.numpy as jnp
    import gptjax

    installed = Path(sys.argv[1]).resolve()
    assert Path(gptjax.__file__).resolve().is_relative_to(installed), gptjax.__file__
    cfg = gptjax.model_config("gpt3-small")
    assert (cfg.n_layer, cfg.d_model, cfg.context_length) == (12, 768, 2048), cfg
    assert gptjax.count_params(cfg) > 100_000_000
    tiny = gptjax.model_config("default")
    params = gptjax.init_params(tiny, jax.random.key(0))
    prompt = jnp.asarray([gptjax.get_tokenizer("byte").encode("def ")], jnp.int32)
    core = jax.jit(gptjax.generate_tokens, static_argnames=("cfg", "max_new_tokens", "sampling"))
    out, num = core(params, tiny, prompt, jnp.asarray([4]), jax.random.key(1), max_new_tokens=5,
                    sampling=gptjax.Sampling(temperature=0.0))
    assert out.shape == (1, 5) and int(num[0]) == 5, (out, num)
    # The jitted core and the host-side generate agree (greedy, the same prompt).
    assert out[0].tolist() == gptjax.generate(params, tiny, prompt.tolist(), max_new_tokens=5,
                                              temperature=0.0)[0]
    print("wheel ok", gptjax.__file__)
""")


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    # Build from a copy of what the wheel is made of, so the checkout gains no build/ folder.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gptjax", src / "gptjax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("gptjax-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (site / "gptjax" / "config" / "presets" / "gpt3-175b.yaml").is_file()
    # PYTHONPATH puts the installed copy ahead of the checkout's editable install; the working
    # directory is outside the checkout, so no configs/ folder is in reach.
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    r = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=run_dir,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site),
                            "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wheel ok" in r.stdout
