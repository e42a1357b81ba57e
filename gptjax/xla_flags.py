"""XLA flags that gptjax sets for speed, merged into XLA_FLAGS before JAX's backends start.

`train.xla_flags` (config) says which: "auto" is `DEFAULT`, "none" sets nothing, anything else
is a space-separated list of flags, in which the word "auto" stands for `DEFAULT`. A flag the
environment's own XLA_FLAGS already names is left as the environment has it.

XLA aborts the whole process on a flag it does not know, and flags come and go between jaxlib
releases. So each flag is first tried in a short subprocess (once per jaxlib version; the answer
is cached): one of ours that this jaxlib lacks is dropped with a warning; one the user named is a
UserError. Every jaxlib build (CPU, CUDA, TPU) parses the same flag table, so GPU flags are
checked, and harmless, on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from importlib.metadata import version
import sys
from pathlib import Path

from gptjax.errors import UserError, warn

# flag -> why. Each applies to GPU backends only; on CPU and TPU they are parsed and ignored.
DEFAULT: dict[str, str] = {
    # Reorders the schedule so collectives and host<->device copies overlap compute (FSDP and
    # data-parallel gradient reductions on several GPUs). NVIDIA's JAX containers set it too.
    "--xla_gpu_enable_latency_hiding_scheduler=true":
        "overlap collectives and copies with compute",
    # cuBLAS for every matmul instead of XLA's own Triton GEMMs, which it chose for some of the
    # step's products and ran slower (the A/B is in docs/performance.md).
    "--xla_gpu_enable_triton_gemm=false": "cuBLAS for all matmuls (faster than Triton GEMMs)",
}


def flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].strip()


def expand(setting: str) -> list[str]:
    """The flags a `train.xla_flags` value asks for, in order, without repeats."""
    words = setting.split()
    if words == ["none"]:
        return []
    out: list[str] = []
    for w in words:
        for f in (DEFAULT if w == "auto" else [w]):
            if f not in out:
                out.append(f)
    bad = [f for f in out if not (f.startswith("--xla_") and len(flag_name(f)) > 6)]
    if bad:
        raise UserError(f"train.xla_flags: {bad[0]!r} is not an XLA flag (--xla_name=value), "
                        f"'auto' or 'none'")
    return out


def _jaxlib_version() -> str:
    try:
        return version("jaxlib")
    except Exception:  # noqa: BLE001 - an unusual install: cache under a neutral key
        return "unknown"


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gptjax" / "xla_flags.json"


def _parses(flags: list[str]) -> bool:
    """Whether this jaxlib starts with XLA_FLAGS=flags (a ~2 s subprocess on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    code = "import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def supported(flags: list[str]) -> dict[str, bool]:
    """{flag: whether the installed jaxlib accepts it}, cached per jaxlib version."""
    path, key = _cache_path(), _jaxlib_version()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    known: dict[str, bool] = cache.get(key, {}) if isinstance(cache.get(key), dict) else {}
    todo = [f for f in flags if f not in known]
    if todo:
        if _parses(todo):  # the usual case: one subprocess for all of them
            known.update(dict.fromkeys(todo, True))
        else:
            known.update({f: _parses([f]) for f in todo})
        cache[key] = known
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: check again next time
    return {f: known[f] for f in flags}


def _backends_started() -> bool:
    """Whether JAX has started a backend (a private API: where it has moved, warn and assume
    not, so the flags may be set too late to act)."""
    try:
        from jax._src import xla_bridge  # private: imported where its absence is handled

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        warn("cannot tell whether JAX has started; train.xla_flags set regardless")
        return False


def apply(setting: str, *, env: dict[str, str] | None = None) -> list[str]:
    """Adds the flags `setting` names to XLA_FLAGS (of `env`, default os.environ).

    Call before JAX starts a backend (before the first device query or computation); returns
    the flags added. Raises UserError for a flag the user named that this jaxlib lacks.
    """
    env = os.environ if env is None else env
    wanted = expand(setting)
    present = {flag_name(f) for f in env.get("XLA_FLAGS", "").split()}
    wanted = [f for f in wanted if flag_name(f) not in present]
    if not wanted:
        return []
    if "jax" in sys.modules and _backends_started():
        raise RuntimeError("xla_flags.apply must run before JAX initializes its backends")
    ok = supported(wanted)
    added = []
    for f in wanted:
        if ok[f]:
            added.append(f)
        elif f in DEFAULT:
            warn(f"jaxlib {_jaxlib_version()} does not know {flag_name(f)}; not set")
        else:
            raise UserError(f"train.xla_flags: jaxlib {_jaxlib_version()} does not accept {f}")
    if added:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "").strip(), *added]).strip()
    return added


# What libtpu is told on a host with no TPU: no Cloud metadata server to ask, a one-chip slice of
# one worker, only fatal logging, and that several processes may load it (its lock file guards
# TPU chips that are not here, and would make a second compiling process fail). Without them, a CPU host with libtpu installed (the `tpu`
# extra, for ahead-of-time TPU compiles) prints a screen of TPU initialisation errors whenever
# JAX starts, before falling back to the CPU.
NO_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
              "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
              "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show as Google PCI devices (as JAX itself checks)


def tpu_attached() -> bool:
    """Whether this host has TPU chips (a Google PCI device)."""
    for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def quiet_libtpu_on_cpu_host() -> None:
    """Sets NO_TPU_ENV (each only if unset) where libtpu is installed but no TPU is attached, so
    JAX starts on the CPU (or GPU) quietly and TPU compiles ahead of time still work. Must run
    before JAX starts a backend; `import gptjax` does it."""
    if importlib.util.find_spec("libtpu") is None or tpu_attached():
        return
    for k, v in NO_TPU_ENV.items():
        os.environ.setdefault(k, v)
