"""Where a benchmark figure comes from: commit, machine, versions, flags, command and date, kept
with every result so a figure in the docs can be traced to the run that gave it."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers",
            "libtpu")


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _gpu() -> dict[str, Any]:
    """Name, memory and driver of the first GPU, from nvidia-smi where there is one."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode or not r.stdout.strip():
        return {}
    name, memory, driver = (x.strip() for x in r.stdout.splitlines()[0].split(","))
    return {"gpu": name, "gpu_memory": memory, "driver": driver}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(argv: list[str] | None = None, prog: str = "python -m gptjax.bench"
               ) -> dict[str, Any]:
    """The record that goes with a result: `prog` and argv (default sys.argv[1:]) make its
    command."""
    dev = jax.devices()[0]
    # Results files do not change what is measured: recording one run must not mark the next.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)results")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "device": dev.device_kind, "backend": jax.default_backend(),
        "devices": jax.device_count(), "cpu": _cpu(), "cpu_count": os.cpu_count(),
        **_gpu(),
        "versions": _versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "command": f"{prog} " + shlex.join(sys.argv[1:] if argv is None else argv),
    }


def append(path: str | Path, result: dict[str, Any]) -> None:
    """One JSON line per result, appended to a results file (results/*.jsonl)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
