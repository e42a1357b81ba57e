#!/usr/bin/env bash
# The table of docs/tpu.md: every GPT-3 preset's train step compiled by XLA:TPU for the Cloud TPU
# slices a user would pick for it, on this host (no TPU needed; libtpu from the `tpu` extra).
# Appends one row per compile to results/tpu-aot.jsonl (OUT=... to write elsewhere); then
# `python -m gptjax.bench.report` rewrites the table. About 45 minutes on 2 cores.
#
#   bash gptjax/bench/tpu_aot.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-results/tpu-aot.jsonl}"

row() {  # row CONFIG SLICE [overrides...]
  local config="$1" slice="$2"
  shift 2
  echo "== $config on $slice $*" >&2
  "$PY" -m gptjax.bench tpu-aot --config "$config" --topology "$slice" --record "$OUT" \
    model.remat=auto "$@" || echo "FAILED: $config on $slice" >&2
}

# One FSDP axis over every chip up to 6.7B; tensor parallelism in fours from 13B; replicas of
# 64-chip groups for 175B. Each microbatch holds a whole number of sequences per data-parallel
# chip (train.microbatches divides the batch so).
for s in v5litepod-8 v5p-8; do
  row gpt3-small "$s" mesh.data=1 mesh.fsdp=-1
  row gpt3-medium "$s" mesh.data=1 mesh.fsdp=-1
  row gpt3-large "$s" mesh.data=1 mesh.fsdp=-1
done
for s in v5litepod-16 v5p-16; do
  row gpt3-xl "$s" mesh.data=1 mesh.fsdp=-1
  row gpt3-2.7b "$s" mesh.data=1 mesh.fsdp=-1
done
row gpt3-6.7b v5p-64 mesh.data=1 mesh.fsdp=-1 train.microbatches=32
row gpt3-6.7b v6e-64 mesh.data=1 mesh.fsdp=-1 train.microbatches=16
row gpt3-13b v5p-64 mesh.data=1 mesh.fsdp=-1 mesh.tensor=4
row gpt3-13b v6e-64 mesh.data=1 mesh.fsdp=-1 mesh.tensor=4
row gpt3-175b v5p-1024 mesh.data=8 mesh.fsdp=16 mesh.tensor=4 train.microbatches=12
# On 256 v6e chips of 32 GiB, replicas of 64 chips hold too much each; sharding the state
# over all 256 (fsdp 64 x tensor 4) does fit.
row gpt3-175b v6e-256 mesh.data=4 mesh.fsdp=16 mesh.tensor=4 train.microbatches=24
row gpt3-175b v6e-256 mesh.data=1 mesh.fsdp=64 mesh.tensor=4 train.microbatches=24
# A plan that does not fit, and what does: 13B on 16 v5e chips (16 GiB each), then on 32.
row gpt3-13b v5litepod-16 mesh.data=1 mesh.fsdp=-1 mesh.tensor=4
row gpt3-13b v5litepod-32 mesh.data=1 mesh.fsdp=-1 mesh.tensor=4
