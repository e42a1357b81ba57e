"""The summary table of a gpu-results.jsonl (gptjax/bench/gpu.sh, gpu_profile.sh): one line per
run; failed and skipped runs as they were recorded.

    python -m gptjax.bench.gpu_summary RESULTS.jsonl
"""

from __future__ import annotations

import json
import sys


def line(r: dict) -> str:
    if "failed" in r or "skipped" in r:
        return str(r)
    if "loop_tokens_per_s" in r:  # bench run: training as train.py runs it
        return (f"{r['config']:12} as run ({r['pipeline']} pipeline) B{r['batch']}x{r['seq']} "
                f"{r['steps']} steps: {r['tokens_per_s']:>10,.0f} tok/s median of "
                f"{r['intervals']} intervals (spread {r['tokens_per_s_spread']:,.0f}), "
                f"{r['loop_tokens_per_s']:,.0f} over them; {r['seconds']:.0f} s in all")
    if "tokens_per_s" not in r:
        big = max(int(b) for b in r["per_batch"])
        return (f"decode {r['device']} prompt {r['prompt_len']} + {r['new_tokens']}, unroll "
                f"{r.get('unroll', 1)}, step attention {r.get('step_attention', 'xla')}: b1 "
                f"{r['decode_ms_per_token_b1']:.3f} ms/token, time to first token "
                f"{r['time_to_first_token_ms_b1']:.1f} ms; b{big} "
                f"{r[f'tokens_per_s_b{big}']:,.0f} tokens/s"
                + (f"; step attention max error vs xla {r['step_attention_max_error']:.1e}"
                   if "step_attention_max_error" in r else ""))

    def f(k: str, s: str = "{:.1%}") -> str:
        return "n/a" if r.get(k) is None else s.format(r[k])

    return (f"{r['config']:12} {r['pattern']:12} B{r['batch']}x{r['seq']} remat={r['remat']:4} "
            f"chunk={r.get('loss_chunk')} {r['tokens_per_s']:>10,.0f} tok/s  MFU {f('mfu')} "
            f"HFU {f('hfu')} (matmuls reach {f('matmul_tflops_measured', '{:.0f}')} TFLOP/s)  "
            f"step {r['step_ms_median']:.1f} ms  compile {r['compile_s']:.0f} s  "
            f"mem {f('peak_memory_gib', '{:.1f}')} GiB  x nanoGPT "
            f"{f('speedup_vs_nanogpt', '{:.2f}')} x HF {f('speedup_vs_hf', '{:.2f}')}  "
            f"{' '.join(r.get('overrides', []))} flags '{r.get('xla_flags', '')}'")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gptjax.bench.gpu_summary RESULTS.jsonl", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        for row in f:
            if row.strip():
                print(line(json.loads(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
