"""Train a GPT: `python train.py [--config configs/X.yaml] [section.key=value ...]`.

With no arguments it trains configs/default.yaml (a small model on the Python standard library's
source, byte tokenizer) into runs/default, and resumes from there if a checkpoint exists.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
from absl import logging as absl_logging

from gptjax import sharding, xla_flags
from gptjax.aot import topology
from gptjax.train import dryrun, trainer
from gptjax.cli import OneLineParser, fraction, host_port, nonneg_int, positive_int, run_cli
from gptjax.config import Config, load_config, override_help
from gptjax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train.py",
        description="Train GPT-3-style models in JAX on whatever devices are present.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any as section.key=value):\n" + override_help(),
    )
    p.add_argument("--config", default="default",
                   help="a configs/*.yaml path or preset name (default: default)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--dry-run", action="store_true",
                   help="build the abstract state on the mesh, print memory and FLOPs, train nothing")
    p.add_argument("--compile", action="store_true",
                   help="with --dry-run: also compile the train step for XLA's memory analysis")
    p.add_argument("--mfu", type=fraction, default=0.5,
                   help="with --dry-run: the MFU assumed for the time estimate, in (0, 1] "
                        "(default 0.5)")
    # A flag, not a config key: it plans for hardware that is not here, and must not follow a
    # run into its checkpoint's config, where a real run measures its own chip.
    p.add_argument("--chip", choices=sorted(topology.TPU_CHIPS), default=None,
                   help="with --dry-run: plan for this Cloud TPU chip (its bf16 peak and HBM "
                        "per chip), whatever devices this machine has")
    p.add_argument("--topology", default=None, metavar="SLICE",
                   help="with --dry-run: compile the train step for this TPU slice with XLA:TPU "
                        "on this host (libtpu) and report XLA's memory per chip: v5e:2x2, "
                        "v5p:8x8x8, ... or a Cloud TPU type: v5litepod-16, v5p-1024, v6e-256")
    p.add_argument("--coordinator", type=host_port, default=None,
                   help="multi-host: coordinator address host:port (process 0)")
    p.add_argument("--num-processes", type=positive_int, default=None,
                   help="multi-host: process count")
    p.add_argument("--process-id", type=nonneg_int, default=None,
                   help="multi-host: this process's id, in [0, num-processes)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each checked by its type; then the one rule that spans two of them."""
    p = build_parser()
    args = p.parse_args(argv)
    n, i = args.num_processes, args.process_id
    if n is not None and i is not None and i >= n:
        p.error(f"--process-id {i} is not in [0, {n}) (--num-processes {n})")
    if args.topology is not None and not args.dry_run:
        p.error("--topology plans for a TPU slice that is not here: it needs --dry-run")
    if args.topology is not None and args.chip is not None:
        p.error("--topology names the chip already: drop --chip")
    return args


def _cluster_env() -> bool:
    """Environments where jax.distributed.initialize() finds its peers by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("train.py", lambda: run(args))


def exit_now(code: int) -> None:
    """Ends the process without waiting for other threads. After a failed run, orbax can leave
    threads waiting for a checkpoint write that will never finish, and Python would wait for
    them forever at exit; everything of the run's own is closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.topology is not None:
        return compile_for_slice(cfg, args)
    if args.dry_run:
        emulate_mesh_on_cpu(cfg)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    xla_flags.apply(cfg.train.xla_flags)  # before any backend starts
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's INFO/WARNING chatter
    start_distributed(args)
    mesh = sharding.make_mesh(cfg.mesh)
    if args.dry_run:
        print(dryrun.dry_run(cfg, mesh, compile=True if args.compile else None, mfu=args.mfu,
                             chip=args.chip).text)
        return 0
    summary = trainer.train(cfg, mesh=mesh)
    if jax.process_index() == 0:
        print(f"done: step {summary['step']}, {summary['tokens']:,} tokens in "
              f"{summary['seconds']:.0f} s; checkpoints in {cfg.train.run_dir}", flush=True)
    return 0


def compile_for_slice(cfg: Config, args: argparse.Namespace) -> int:
    """--dry-run --topology: the train step compiled by XLA:TPU for the slice, on this host."""
    target, mesh = topology.for_slice(cfg.mesh, args.topology)
    print(dryrun.dry_run(cfg, mesh, mfu=args.mfu, target=target).text, flush=True)
    return 0


def emulate_mesh_on_cpu(cfg: Config) -> None:
    """A dry run of a mesh of explicit sizes emulates that many CPU devices, so a 175B config
    can be planned on a laptop. JAX reads these settings only when its backends start."""
    m = cfg.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    if -1 in sizes:
        return
    jax.config.update("jax_platforms", "cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    n = sizes[0] * sizes[1] * sizes[2]
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def start_distributed(args: argparse.Namespace) -> None:
    """jax.distributed for several processes: from the flags, or found by JAX in a cluster."""
    if args.coordinator is None and args.num_processes is None and not _cluster_env():
        return
    # CPU collectives across processes (CPU clusters, tests) go through gloo; it does not
    # affect GPU or TPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if args.coordinator is not None:
        kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise UserError("jax.distributed.initialize failed: "
                        f"{(str(e).splitlines() or [repr(e)])[0]}") from None


if __name__ == "__main__":
    code = main()
    if code:
        exit_now(code)
    sys.exit(code)
