"""Eight emulated CPU devices, set before jax is first imported, so mesh tests run anywhere; and
one persistent compilation cache for the session's processes: the subprocesses (train.py,
sample.py, the servers) compile the same tiny programs again and again, and XLA's compile, not
the steps, is most of their time."""

import os
from pathlib import Path

# XLA's compiles are most of the suite's time on a new machine (the cache below is cold), and
# its tiny programs need no fast code: LLVM at -O0, and XLA:CPU's older elemental emitters in
# place of its MLIR fusion emitters. A tiny train step compiled in 2.9 s with neither, 1.5 s with
# -O0 and 0.7 s with both (this 2-core machine). helpers.process_env passes the same flags on to
# the processes a test starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Inherited by every subprocess a test starts. Keyed by XLA on the program, its compile options,
# the devices and the jax/jaxlib versions, so a hit is the program a compile would give: the
# cache is the machine's (as ccache is), shared by every checkout and clone of the repository,
# and a fresh clone on a machine that ran the suite before skips its minutes of compiles.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptjax" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import socket  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def pytest_configure(config: pytest.Config) -> None:
    # Also in pyproject.toml; registered here too so that `-m "not slow"` and --strict-markers
    # work whatever ini file pytest finds.
    config.addinivalue_line(
        "markers", "slow: a test of many seconds (a subprocess, a training run, a benchmark "
        "script); `make test-fast` leaves these out, `make test` runs them")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, run directory) of one tiny run trained for helpers.TRAINED_STEPS steps, shared
    by the session's tests (and its xdist workers: one trains, the others wait). Read it; copy it
    (helpers.copy_run) to change it."""
    from helpers import train_shared_run

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is a folder of the session's: share that one.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained-run"
    return train_shared_run(root)
