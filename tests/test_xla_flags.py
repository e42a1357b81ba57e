"""XLA flags: gptjax's defaults parse on the installed jaxlib; unknown flags never abort a run."""

from pathlib import Path

import jax
import pytest

from gptjax import xla_flags
from gptjax.errors import UserError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "gptjax" / "xla_flags.json"


def test_expand() -> None:
    d = list(xla_flags.DEFAULT)
    assert xla_flags.expand("auto") == d
    assert xla_flags.expand("none") == []
    assert xla_flags.expand("--xla_gpu_x=1 auto --xla_gpu_x=1") == ["--xla_gpu_x=1", *d]
    for bad in ("-xla_foo=1", "auto none", "--xla_=1", "triton"):
        with pytest.raises(UserError, match="train.xla_flags"):
            xla_flags.expand(bad)


def test_defaults_parse_on_this_jaxlib(cache: Path) -> None:
    # Fails the day a jaxlib upgrade drops one of them: then take it out of DEFAULT.
    assert all(xla_flags.supported(list(xla_flags.DEFAULT)).values())
    assert cache.exists()


@pytest.mark.slow
def test_apply_keeps_user_flags_and_drops_unknown_defaults(
        cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    name = next(iter(xla_flags.DEFAULT)).split("=")[0]
    env = {"XLA_FLAGS": f"{name}=false"}
    others = [f for f in xla_flags.DEFAULT if not f.startswith(f"{name}=")]
    assert xla_flags.apply("auto", env=env) == others  # the user's own value wins
    assert env["XLA_FLAGS"].split() == [f"{name}=false", *others]

    monkeypatch.setitem(xla_flags.DEFAULT, "--xla_gpu_no_such_flag_gptjax=true", "test")
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    added = xla_flags.apply("auto", env=env)
    assert added == [f for f in xla_flags.DEFAULT if "no_such" not in f]
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false", *added]
    assert "does not know --xla_gpu_no_such_flag_gptjax" in capsys.readouterr().err
    # The answer is cached per jaxlib version: no subprocess the second time.
    monkeypatch.setattr(xla_flags, "_parses", lambda flags: pytest.fail("not cached"))
    assert xla_flags.supported(["--xla_gpu_no_such_flag_gptjax=true"]) == {
        "--xla_gpu_no_such_flag_gptjax=true": False}
    # A flag the user asked for by name is an error, not a silent drop.
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent.parent))
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    with pytest.raises(UserError, match="does not accept --xla_gpu_no_such_flag_gptjax"):
        xla_flags.apply("--xla_gpu_no_such_flag_gptjax=true", env={})


def test_apply_refuses_after_backends_started() -> None:
    jax.devices()
    with pytest.raises(RuntimeError, match="before JAX initializes"):
        xla_flags.apply("--xla_gpu_enable_latency_hiding_scheduler=false", env={})
    assert xla_flags.apply("none", env={}) == []  # nothing to set: nothing to refuse


def test_libtpu_on_a_cpu_host_starts_jax_quietly() -> None:
    """With libtpu installed (the tpu extra) and no TPU attached, a process that imports gptjax
    starts JAX on the CPU without libtpu's screen of initialisation errors; one that starts JAX
    first gets them (the check can fail). The process start is what is tested."""
    import importlib.util
    import os
    import subprocess
    import sys

    assert importlib.util.find_spec("libtpu") is not None, "make install installs the tpu extra"
    assert not xla_flags.tpu_attached()
    env = {k: v for k, v in os.environ.items()  # as a user's shell has it: no setting of ours
           if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL") and k not in xla_flags.NO_TPU_ENV}

    def start(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)

    quiet = start("import gptjax, jax; print(jax.devices()[0].platform)")  # lock file waived
    assert quiet.returncode == 0 and quiet.stdout.strip() == "cpu"
    assert "TPU" not in quiet.stderr and "libtpu" not in quiet.stderr, quiet.stderr
    # (Where another process holds libtpu's lock file, libtpu would give up quietly instead: the
    # contrast is made with the lock waived.)
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    noisy = start("import jax; print(jax.devices()[0].platform)")
    assert noisy.stdout.strip() == "cpu" and "TPU" in noisy.stderr
