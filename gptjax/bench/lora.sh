#!/usr/bin/env bash
# Full fine-tuning against LoRA on gpt3-small: train-step time, XLA's memory need, peak RSS,
# trainable parameters, optimizer state and one checkpoint's bytes (python -m gptjax.bench
# train, synthetic batches; LoRA over a random base, so train.init_from is not read). Appends
# one row per variant to results/lora.jsonl (OUT=... to write elsewhere); each variant runs in
# its own process, so peak RSS is its own. On this project's 2-core CPU: about 15 minutes.
#
#   bash gptjax/bench/lora.sh            # SEQ=512 BATCH=1 STEPS=5 by default
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-results/lora.jsonl}"
SEQ="${SEQ:-512}" BATCH="${BATCH:-1}" STEPS="${STEPS:-5}"

row() {  # row [overrides...]
  echo "== gpt3-small $*" >&2
  "$PY" -m gptjax.bench train --config gpt3-small --seq "$SEQ" --batch "$BATCH" \
    --steps "$STEPS" --remat none --record "$OUT" "$@" || echo "FAILED: $*" >&2
}

row
row train.lora_rank=8 train.lora_targets=qkv,out train.init_from=random
row train.lora_rank=16 train.lora_targets=qkv,out,fc,proj train.init_from=random
