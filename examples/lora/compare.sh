#!/usr/bin/env bash
# docs/finetune-eval.md's worked example: the demo model (runs/default, from `make demo` or
# `python train.py`) fine-tuned on a prompt -> completion task from the standard library
# (make_task.py), every weight against LoRA adapters, the same steps and data. Each run is
# `python -m gptjax.bench run`, which records its validation losses with provenance in
# results/lora-example.jsonl (OUT=... to write elsewhere). About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-results/lora-example.jsonl}"
"$PY" examples/lora/make_task.py runs/task/task.jsonl
COMMON=(train.init_from=runs/default "data.source=runs/task/*.jsonl" data.val_fraction=0.1
        train.eval_batches=0 optim.warmup_tokens=40960 optim.decay_tokens=1228800
        optim.min_lr_ratio=0.1)
run() { "$PY" -m gptjax.bench run --steps 300 --batch 32 --log-every 50 --record "$OUT" \
          "${COMMON[@]}" "$@"; }
run optim.learning_rate=1e-3
run optim.learning_rate=1e-2 train.lora_rank=8 train.lora_targets=qkv,out
run optim.learning_rate=1e-2 train.lora_rank=16 train.lora_targets=qkv,out,fc,proj
