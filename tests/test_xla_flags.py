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
