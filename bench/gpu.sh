#!/usr/bin/env bash
# Every GPU measurement in one go, for one device call of under 8 minutes on one H100/H200:
# train-step MFU for gpt3-small/medium/xl, the same-shape Hugging Face GPT-2 + torch.compile
# comparison, and decode latency/throughput. Results go to $OUT/gpu-results.jsonl (one JSON
# object per line) and the log to $OUT/gpu-bench.log.
#   run on the device machine from the repo root:  bash bench/gpu.sh
# JAX, flax, optax, orbax, torch and transformers are on that machine; TensorFlow is not (the
# benchmarks use synthetic batches).
set -uo pipefail
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
RES="$OUT/gpu-results.jsonl"
: > "$RES"
py() { timeout "$1" python3 -m gptjax.bench "${@:2}" --json >> "$RES" 2>> "$OUT/gpu-bench.log" \
       || echo "{\"failed\": \"${*:2}\"}" >> "$RES"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/gpu-bench.log"
# gpt3-small at 2048: GPT-3's pattern, then all-dense against torch like for like.
py 150 train --config gpt3-small --batch 16 --steps 10
py 200 train --config gpt3-small --batch 16 --steps 10 --compare-torch model.attention_pattern=dense
py 120 train --config gpt3-medium --batch 8 --steps 8
py 150 train --config gpt3-xl --batch 8 --steps 6 --remat full
py 90 decode --config gpt3-small --batch-sizes 1,64
cat "$RES"
