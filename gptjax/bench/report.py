"""The docs' result tables, made from the committed results files (results/*.jsonl).

    python -m gptjax.bench.report          # rewrite the tables: docs/performance.md, sweep.md,
                                           # tpu.md
    python -m gptjax.bench.report --check  # exit 1 if a table there differs from its results

A table sits between `<!-- results:NAME -->` and `<!-- /results -->` in the doc; TABLES says
which rows of which file it shows. Each row is one benchmark result, which carries its own
provenance (commit, device, versions, flags, command, date: gptjax/bench/provenance.py), so a
figure in the docs can be traced to the run that gave it. Medians are shown with the spread
(max - min) where the benchmark reports one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "results"
DOC = ROOT / "docs" / "performance.md"
# the docs that hold results tables
DOCS = (DOC, ROOT / "docs" / "sweep.md", ROOT / "docs" / "tpu.md",
        ROOT / "docs" / "finetune-eval.md", ROOT / "docs" / "data.md")


def _num(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _command(r: dict[str, Any]) -> str:
    """The row's command as a reader would rerun it: without --json and --record FILE."""
    words = r["provenance"]["command"].split()
    kept = [w for i, w in enumerate(words)
            if w not in ("--json", "--record") and (i == 0 or words[i - 1] != "--record")]
    return f"`{' '.join(kept)}`"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _source(r: dict[str, Any]) -> str:
    p = r["provenance"]
    dirty = " (dirty)" if p.get("dirty") else ""
    return f"{p['date'][:10]}, {(p.get('commit') or '?')[:7]}{dirty}"


def _train_row(r: dict[str, Any]) -> list[str]:
    return [r["config"], _params(r["params"]), f"{r['batch']} × {r['seq']}", r["pattern"],
            r["remat"],
            _num(r["tokens_per_s"], 0),
            f"{_num(r['step_ms_median'])} (± {_num(r['step_ms_spread'] / 2)})",
            _pct(r.get("mfu")), _pct(r.get("hfu")), _num(r.get("compile_s")),
            _command(r), _source(r)]


def _decode_row(r: dict[str, Any]) -> list[str]:
    big = max(int(b) for b in r["per_batch"])
    return [_params(r["n_params"]), f"{r['prompt_len']} + {r['new_tokens']}", str(r["max_len"]),
            r["dtype"],
            _num(r.get("decode_ms_per_token_b1"), 3), _num(r.get("prefill_ms_b1"), 1),
            f"{_num(r[f'tokens_per_s_b{big}'], 0)} (batch {big})",
            _command(r), _source(r)]


def _attention_rows(r: dict[str, Any]) -> list[list[str]]:
    return [[str(row["T"]), _num(row["banded_ms"]), _num(row["dense_ms"]),
             _command(r), _source(r)] for row in r["rows"]]


def _data_row(r: dict[str, Any]) -> list[str]:
    rate = {k: f"{v['tokens_per_s'] / 1e6:.1f}M" for k, v in r["pipelines"].items()}
    return [f"{r['batch']} × {r['seq']}", rate.get("tf.data", "n/a"), rate.get("threads", "n/a"),
            _num(r["byte_mb_per_s"], 0), _num(r["gpt2_mb_per_s"]),
            _num(r["gpt2_mb_per_s_parallel"]), _num(r["cache_build_s"], 2),
            _command(r), _source(r)]


def _sweep_row(r: dict[str, Any]) -> list[str]:
    return [r["size"], f"{r['params']:,}", f"{r['budget']:.0e}", f"{r['steps']:,}",
            f"{r['tokens'] / 1e6:.2f}M", f"{r['val_loss']:.3f}", f"{r['seconds']:.0f}",
            f"{r['flops'] / r['seconds'] / 1e9:.1f}"]


RUN_HEADER = ["model", "learning rate", "steps × batch", "seconds", "tokens/s", "eval batches",
              "validation loss at each evaluation", "whole split, at the end", "command",
              "date, commit"]


def _run_row(r: dict[str, Any]) -> list[str]:
    m = r["config"]["model"]
    losses = " → ".join(f"{loss:.3f}" for _, loss in r["val_losses"])
    o = r["config"]["optim"]
    lr = f"{o['learning_rate']:g} → {o['learning_rate'] * o['min_lr_ratio']:g}"
    return [f"{m['n_layer']}x{m['d_model']}, {m['n_head']} head(s), T {m['context_length']}", lr,
            f"{r['steps']:,} × {r['config']['train']['batch_size']}", f"{r['seconds']:.0f}",
            _num(r["tokens_per_s_median"], 0), f"{r['config']['train']['eval_batches'] or 'all'}",
            losses, f"{r['full_split_val_loss']:.3f}", _command(r),
            _source(r)]


def _tpu_aot_row(r: dict[str, Any]) -> list[str]:
    mesh = "×".join(str(r["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    tried, refused = r.get("remat_tried") or {}, set(r.get("refused") or ())
    remat = r.get("remat") or "none fits"
    if len(tried) > 1 or r.get("fits") is False:
        remat += " (" + ", ".join(
            f"{k} {'≥ ' if k in refused else ''}{_num(v, 1)}" for k, v in tried.items()) + ")"
    need = r.get("need_gib")
    least = r.get("need_at_least_gib")
    need_text = _num(need, 1) if need is not None else (
        f"≥ {_num(least, 1)}" if least is not None else "refused")
    fits = {True: "yes", False: "**no**"}.get(r.get("fits"), "?")
    return [r["config"], f"{r['slice']} ({r['topology']})", str(r["n_chips"]), mesh,
            f"{r['microbatches']} × {r['seqs_per_device']}", remat,
            _num(r.get("arguments_gib"), 1), _num(r.get("temporaries_gib"), 1),
            need_text, f"{r['hbm_gib']:g}", fits,
            _num(sum((r.get("compile_s") or {}).values()), 0), _source(r)]


def _lora_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """LoRA variants against the full fine-tuning row of the same shape (lora None)."""
    full = {(r["config"], r["batch"], r["seq"]): r for r in rows if not r.get("lora")}
    out = []
    for r in rows:
        f = full.get((r["config"], r["batch"], r["seq"]), r)
        share = lambda k: f"{100 * r[k] / f[k]:.2f}%"  # noqa: E731
        out.append([r["config"], r.get("lora") or "full fine-tuning", f"{r['batch']} × {r['seq']}",
                    f"{r['trainable_params']:,}",
                    f"{r['optimizer_state_bytes'] / 2**20:,.1f} ({share('optimizer_state_bytes')})",
                    f"{r['checkpoint_bytes'] / 2**20:,.1f} ({share('checkpoint_bytes')})",
                    f"{_num(r['step_ms_median'], 0)} ± {_num(r['step_ms_spread'] / 2, 0)}",
                    _num(r["memory_needed_gib"][r["remat"]], 2), _num(r["peak_rss_gib"], 2),
                    _source(r)])
    return out


def _lora_example_row(r: dict[str, Any]) -> list[str]:
    t, o = r["run_config"]["train"], r["run_config"]["optim"]
    what = (f"LoRA rank {t['lora_rank']}, {','.join(t['lora_targets'])}" if t.get("lora_rank")
            else "every weight")
    losses = " → ".join(f"{loss:.3f}" for _, loss in r["val_losses"])
    return [what, f"{o['learning_rate']:g}", f"{r['steps']:,} × {r['batch']}", losses,
            f"{r['seconds']:.0f}", _command(r), _source(r)]


def _cache_rows(r: dict[str, Any]) -> list[list[str]]:
    """A row per tokenizer: the build, then the killed-and-resumed one."""
    c, out = r["corpus"], []
    for b in r["builds"]:
        res = b.get("resume") or {}
        resumed = (f"{res['resumed_shards']} of {b['shards']} shards kept; "
                   f"{'equal' if res['sha256_equal'] and res['shards_equal'] else 'DIFFERENT'}"
                   if res else "n/a")
        out.append([f"{c['bytes_on_disk'] / 1e9:.2f} GB ({c['text_bytes'] / 1e9:.2f} GB text)",
                    b["tokenizer"], str(b["cores"]), f"{b['tokens'] / 1e6:,.0f}M",
                    f"{b['seconds']:,.0f}", f"{b['tokens_per_s_per_core'] / 1e6:,.2f}M",
                    f"{b['text_mb_per_s']:,.1f}", f"{b['peak_rss_mib']:,}",
                    f"{b['peak_rss_one_process_mib']:,}", resumed, _source(r)])
    return out


# name -> (results file, subcommand (None: every row), header, row maker returning one row or
# a list of rows)
TABLES: dict[str, tuple[str, str | None, list[str], Callable[[dict[str, Any]], Any] | None]] = {
    "demo-cpu": ("demo-cpu.jsonl", None,
                 RUN_HEADER, _run_row),
    "demo-cpu-tuning": ("demo-cpu-tuning.jsonl", None,
                        RUN_HEADER, _run_row),
    "sweep-cpu": ("sweep-cpu/points.jsonl", None,
                  ["size", "N", "budget (FLOPs)", "steps", "tokens", "val loss", "seconds",
                   "GFLOP/s"], _sweep_row),
    "cpu-train": ("cpu.jsonl", "train",
                  ["config", "params", "batch × T", "pattern", "remat", "tokens/s",
                   "step ms (± half spread)",
                   "MFU", "HFU", "compile s", "command", "date, commit"], _train_row),
    "cpu-decode": ("cpu.jsonl", "decode",
                   ["params", "prompt + new", "cache", "dtype", "ms/token (batch 1)", "prefill ms",
                    "tokens/s", "command", "date, commit"], _decode_row),
    "cpu-data": ("cpu.jsonl", "data",
                 ["batch × T", "tf.data tokens/s", "threads tokens/s", "byte MB/s",
                  "gpt2 MB/s (1 core)", "gpt2 MB/s (2 workers)", "stdlib byte cache build s",
                  "command", "date, commit"], _data_row),
    "tpu-aot": ("tpu-aot.jsonl", "tpu-aot",
                ["preset", "slice", "chips", "mesh d×f×t", "microbatches × seqs/chip",
                 "remat (tried: XLA's GiB; ≥: refused)", "arguments GiB", "temporaries GiB", "XLA needs GiB",
                 "HBM GiB", "fits", "compile s", "date, commit"],
                _tpu_aot_row),
    "lora-cpu": ("lora.jsonl", "train",
                 ["preset", "trained", "batch × T", "trainable params", "optimizer state MiB",
                  "checkpoint MiB", "step ms (± half spread)", "XLA needs GiB", "peak RSS GiB",
                  "date, commit"], None),
    "lora-example": ("lora-example.jsonl", "run",
                     ["fine-tuned", "peak lr", "steps × batch", "validation loss (start → end)",
                      "seconds", "command", "date, commit"], _lora_example_row),
    "cache-build": ("cache-build.jsonl", "cache",
                    ["corpus (Parquet)", "tokenizer", "cores", "tokens", "seconds",
                     "tokens/s per core", "text MB/s", "peak RSS MiB (all processes)",
                     "peak RSS MiB (largest process)", "killed at half, resumed",
                     "date, commit"], _cache_rows),
    "cpu-attention": ("cpu.jsonl", "attention",
                      ["T", "banded ms", "dense ms", "command", "date, commit"], _attention_rows),
}


def load(name: str) -> list[dict[str, Any]]:
    path = RESULTS / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subcommand(r: dict[str, Any]) -> str:
    return r["provenance"]["command"].split()[3]  # python -m gptjax.bench SUBCOMMAND ...


def table(name: str) -> str:
    file, what, header, make = TABLES[name]
    rows: list[list[str]] = []
    picked = [r for r in load(file)
              if what is None or ("provenance" in r and subcommand(r) == what)]
    if make is None:  # rows that are read together (a comparison)
        rows = _lora_rows(picked)
    for r in picked if make is not None else ():
        made = make(r)
        rows.extend(made if made and isinstance(made[0], list) else [made])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(doc: str) -> str:
    """The doc with every results table made anew from its file."""
    def fill(m: re.Match[str]) -> str:
        return f"<!-- results:{m.group(1)} -->\n{table(m.group(1))}\n<!-- /results -->"

    return re.sub(r"<!-- results:([\w-]+) -->\n.*?<!-- /results -->", fill, doc, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptjax.bench.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the doc's tables are stale")
    a = p.parse_args(argv)
    stale = 0
    for path in DOCS:
        doc = path.read_text()
        new = render(doc)
        if a.check and new != doc:
            print(f"{path} differs from results/: run python -m gptjax.bench.report",
                  file=sys.stderr)
            stale = 1
        elif not a.check:
            path.write_text(new)
    return stale


if __name__ == "__main__":
    sys.exit(main())
