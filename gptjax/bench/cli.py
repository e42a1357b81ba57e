"""`python -m gptjax.bench`: the benchmarks' command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from gptjax import xla_flags
from gptjax.bench.run import bench_run, check_steps
from gptjax.bench.attention import bench_attention
from gptjax.bench.cache import bench_cache
from gptjax.bench.data import bench_data
from gptjax.bench.decode import bench_decode
from gptjax.bench.loglikelihood import bench_loglikelihood
from gptjax.bench.provenance import append, provenance
from gptjax.bench.serve import bench_serve
from gptjax.bench.torch import COMPILE_MODES, PEERS, bench_torch, torch_in_subprocess
from gptjax.bench.tpu_aot import bench_tpu_aot
from gptjax.bench.train import bench_train
from gptjax.config import load_config
from gptjax.cli import OneLineParser, int_list, out_dir, positive_int, run_cli, user_path
from gptjax.errors import UserError, warn


def torch_modes(text: str) -> tuple[str, ...]:
    """--torch-modes M1,M2: each one of COMPILE_MODES."""
    modes = tuple(text.split(","))
    for m in modes:
        if m not in COMPILE_MODES:
            raise argparse.ArgumentTypeError(f"{m!r} is not one of {', '.join(COMPILE_MODES)}")
    return modes


def main(argv: list[str] | None = None) -> int:
    p, sub = build_parser()
    args = p.parse_args(argv)
    if args.what == "run":
        try:
            check_steps(args.steps, args.log_every)
        except UserError as e:
            sub.choices["run"].error(str(e))
    return run_cli("gptjax.bench", lambda: _run(args, argv))


def build_parser() -> tuple[OneLineParser, Any]:
    """The parser and its subcommands' action (`.choices`: name -> parser)."""
    # Every count is checked by its type (positive_int, int_list): a bad value is one line before
    # any benchmark starts, as in the other commands.
    p = OneLineParser(prog="python -m gptjax.bench", description="Benchmarks (not tests); each "
                      "prints a table, or one JSON object with --json.")
    sub = p.add_subparsers(dest="what", required=True, parser_class=OneLineParser)
    _step_parsers(sub)
    _use_parsers(sub)
    for q in sub.choices.values():
        q.add_argument("--json", action="store_true", help="print one JSON object")
        q.add_argument("--record", metavar="FILE.jsonl", type=user_path,
                       help="also append the result, with its provenance, to this results file "
                            "(results/*.jsonl: the docs' tables are made from those)")
    return p, sub


def _step_parsers(sub: Any) -> None:
    """attention, train, torch: the model's kernels and train step."""
    a = sub.add_parser("attention", help="banded vs dense attention time as T grows")
    a.add_argument("--seqs", type=int_list, default=(1024, 2048, 4096))
    a.add_argument("--window", type=positive_int, default=256)
    a.add_argument("--heads", type=positive_int, default=4)
    a.add_argument("--head-dim", type=positive_int, default=64)
    a.add_argument("--batch", type=positive_int, default=1)
    a.add_argument("--repeats", type=positive_int, default=5)
    t = sub.add_parser("train", help="train-step tokens/s and MFU on synthetic batches")
    t.add_argument("--config", default="default")
    t.add_argument("--batch", type=positive_int, default=None)
    t.add_argument("--seq", type=positive_int, default=None)
    t.add_argument("--remat", choices=("none", "dots", "full", "auto"), default=None,
                   help="auto: the least recomputation whose memory fits the device")
    t.add_argument("--peak", choices=("auto", "yes", "no"), default="auto",
                   help="measure the bf16 matmul rate and report MFU against it (auto: GPU/TPU)")
    t.add_argument("--steps", type=positive_int, default=10)
    t.add_argument("--profile", metavar="DIR", type=out_dir, default=None,
                   help="also write a profiler trace of 3 steps and the compiled HLO into DIR")
    t.add_argument("--compare-torch", action="store_true",
                   help="also time the PyTorch peers (nanoGPT-style and Hugging Face GPT-2, "
                        "torch.compile) at the same shape")
    t.add_argument("--torch-modes", type=torch_modes, default=("default", "max-autotune"),
                   help="torch.compile modes tried for the nanoGPT-style peer (best counts; "
                        "Hugging Face's runs the first); eager = no compile")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    h = sub.add_parser("torch", help="one PyTorch peer's train step at a config's shape, "
                                     "torch.compile'd (what train --compare-torch runs)")
    h.add_argument("--config", default="default")
    h.add_argument("--batch", type=positive_int, default=None)
    h.add_argument("--seq", type=positive_int, default=None)
    h.add_argument("--steps", type=positive_int, default=10)
    h.add_argument("--peer", choices=PEERS, default="nanogpt")
    h.add_argument("--mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode; eager = no compile")
    h.add_argument("overrides", nargs="*", metavar="section.key=value")


def _use_parsers(sub: Any) -> None:
    """decode, serve, run, data, loglikelihood: the model in use, and its input."""
    d = sub.add_parser("decode", help="prefill time, per-token latency, batched throughput")
    d.add_argument("--config", default="default")
    d.add_argument("--batch-sizes", type=int_list, default=(1, 64))
    d.add_argument("--prompt-len", type=positive_int, default=None)
    d.add_argument("--new-tokens", type=positive_int, default=None)
    d.add_argument("--unroll", type=positive_int, default=None,
                   help="decode steps per iteration of the device loop (default: the sampler's)")
    d.add_argument("--temperature", type=float, default=0.0,
                   help="0 (the default) decodes greedily; above 0 samples, with --top-k/--top-p")
    d.add_argument("--top-k", type=int, default=0, help="0 disables")
    d.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    d.add_argument("overrides", nargs="*", metavar="section.key=value")
    v = sub.add_parser("serve", help="completion server: latency and tokens/s under load")
    v.add_argument("--config", default="default")
    v.add_argument("--clients", type=positive_int, default=32)
    v.add_argument("--requests", type=positive_int, default=2, help="per client, in turn")
    v.add_argument("--prompt-len", type=positive_int, default=128)
    v.add_argument("--new-tokens", type=positive_int, default=128)
    v.add_argument("--max-batch", type=positive_int, default=32)
    v.add_argument("--steps-per-call", type=positive_int, default=4)
    v.add_argument("overrides", nargs="*", metavar="section.key=value")
    r = sub.add_parser("run", help="training as train.py runs it (real data, evaluation, a "
                                   "checkpoint): tokens/s from its log")
    r.add_argument("--config", default="default")
    r.add_argument("--steps", type=positive_int, default=200)
    r.add_argument("--batch", type=positive_int, default=None)
    r.add_argument("--log-every", type=positive_int, default=20)
    r.add_argument("--run-dir", type=out_dir, default=None,
                   help="keep the run here (default: a temporary directory, removed)")
    r.add_argument("overrides", nargs="*", metavar="section.key=value")
    c = sub.add_parser("cache", help="python -m gptjax.data build on a generated Parquet "
                                     "corpus: tokens/s per core, peak RSS, kill and resume")
    c.add_argument("--gb", type=float, default=1.0, help="corpus size on disk (default 1 GB)")
    c.add_argument("--tokenizers", default="byte,gpt2", help="comma-separated (default: both)")
    c.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                   help="data.num_workers of the builds (default: one per core)")
    c.add_argument("--workdir", type=out_dir, default=Path(".cache/gptjax/bench-cache"),
                   help="where the corpus (kept) and the caches (removed) are written")
    c.add_argument("--no-resume", action="store_true", help="skip the kill-and-resume build")
    g = sub.add_parser("data", help="tokenizer MB/s and tokens/s from the cache")
    g.add_argument("--seq", type=positive_int, default=2048)
    g.add_argument("--batch", type=positive_int, default=8)
    ll = sub.add_parser("loglikelihood", help="few-shot/lm-eval scoring tokens/s against the "
                                              "train step's forward pass")
    ll.add_argument("--config", default="default")
    ll.add_argument("--requests", type=positive_int, default=256)
    ll.add_argument("--score-batch", type=positive_int, default=None)
    ll.add_argument("--batch", type=positive_int, default=None)
    ll.add_argument("--repeats", type=positive_int, default=5)
    ll.add_argument("overrides", nargs="*", metavar="section.key=value")
    x = sub.add_parser("tpu-aot", help="the train step compiled by XLA:TPU for a TPU slice on "
                                       "this host: XLA's memory per chip vs the estimate")
    x.add_argument("--config", default="default")
    x.add_argument("--topology", required=True, metavar="SLICE",
                   help="v5e:2x2, v5p-1024, ... (as train.py --dry-run --topology)")
    x.add_argument("overrides", nargs="*", metavar="section.key=value")


def _run(args: argparse.Namespace, argv: list[str] | None) -> None:
    if args.what in ("train", "run"):
        # Before JAX starts a backend: the flags train.py would set, unless overridden
        # (train.xla_flags=none measures without them). Decoding sets none, as sample.py.
        setting = load_config(args.config, args.overrides).train.xla_flags
        try:
            out_flags = xla_flags.apply(setting)
        except RuntimeError:  # called in-process after JAX started (tests, notebooks)
            warn("JAX has started; train.xla_flags not applied")
            out_flags = []
    if args.what == "attention":
        out = bench_attention(list(args.seqs), args.window, args.heads, args.head_dim, args.batch,
                              args.repeats)
    elif args.what == "train":
        torch_out = torch_in_subprocess(args) if args.compare_torch else None
        out = bench_train(args.config, args.overrides, args.batch, args.seq, args.remat,
                          args.steps, {"auto": None, "yes": True, "no": False}[args.peak],
                          args.profile)
        if torch_out is not None:
            out.update(torch_out)
            for peer in PEERS:
                out[f"speedup_vs_{peer}"] = out["tokens_per_s"] / out[f"torch_{peer}_tokens_per_s"]
    elif args.what == "torch":
        cfg = load_config(args.config, args.overrides)
        m = cfg.model
        if args.seq:
            m = dataclasses.replace(m, context_length=args.seq)
        out = bench_torch(m, args.batch or cfg.train.batch_size, args.steps, args.peer, args.mode)
    elif args.what == "decode":
        cfg = load_config(args.config, args.overrides).model
        kw = {"batch_sizes": args.batch_sizes, "unroll": args.unroll,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        if args.prompt_len:
            kw["prompt_len"] = args.prompt_len
        if args.new_tokens:
            kw["new_tokens"] = args.new_tokens
        out = bench_decode(cfg, **kw)
    elif args.what == "serve":
        out = bench_serve(load_config(args.config, args.overrides).model, clients=args.clients,
                          requests=args.requests, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, max_batch=args.max_batch,
                          steps_per_call=args.steps_per_call)
    elif args.what == "run":
        out = bench_run(args.config, args.overrides, steps=args.steps, batch=args.batch,
                        log_every=args.log_every, run_dir=args.run_dir)
    elif args.what == "loglikelihood":
        out = bench_loglikelihood(args.config, args.overrides, requests=args.requests,
                                  batch=args.score_batch, train_batch=args.batch,
                                  repeats=args.repeats)
    elif args.what == "cache":
        out = bench_cache(Path(args.workdir), args.gb, args.tokenizers.split(","), args.workers,
                          resume=not args.no_resume)
    elif args.what == "tpu-aot":
        out = bench_tpu_aot(args.config, args.topology, args.overrides)
    else:
        out = bench_data(seq=args.seq, batch=args.batch)
    if args.what in ("train", "run", "decode", "serve"):
        out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        out["overrides"] = args.overrides
    if args.what in ("train", "run"):
        out["xla_flags_added"] = out_flags
    out["provenance"] = provenance(argv)
    if args.record:
        append(args.record, out)
    if args.json:
        print(json.dumps(out))
    else:
        _print(out)


def _print(out: dict[str, Any], indent: str = "") -> None:
    for k, v in out.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            print(f"{indent}{k}:")
            for row in v:
                print(indent + "  " + "  ".join(f"{rk}={_fmt(rv)}" for rk, rv in row.items()))
        elif isinstance(v, dict):
            print(f"{indent}{k}:")
            _print(v, indent + "  ")
        else:
            print(f"{indent}{k}: {_fmt(v)}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)

