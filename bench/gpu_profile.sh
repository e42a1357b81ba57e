#!/usr/bin/env bash
# Where a train step's time goes on one GPU: profiler traces of gpt3-small and gpt3-medium (for
# bench/xplane_summary.py, here afterwards) and gpt3-small A/B variants, one change each, in one
# device call. Results as bench/gpu.sh's: $OUT/gpu-results.jsonl, $OUT/gpu-bench.log, and
# $OUT/prof-<name>.xplane.pb.gz + .hlo.txt.gz per trace.
set -uo pipefail
OUT="${OUT:-bench-out}"
BUDGET="${BUDGET:-270}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
RES="$OUT/gpu-results.jsonl" LOG="$OUT/gpu-bench.log"
: > "$RES"
START=$SECONDS
TINY=(model.n_layer=2 model.d_model=32 model.n_head=2 model.d_ff=64 model.context_length=64
      model.local_window=16 model.vocab_size=512 mesh.data=1 mesh.fsdp=1)
source "$(dirname "$0")/gpu_lib.sh"
keep_trace() {  # keep_trace NAME: the trace and HLO that `--profile /tmp/prof-NAME` wrote
  local pb; pb=$(find "/tmp/prof-$1" -name '*.xplane.pb' | head -n 1)
  [[ -n "$pb" ]] && gzip -c "$pb" > "$OUT/prof-$1.xplane.pb.gz"
  [[ -f "/tmp/prof-$1/step.hlo.txt" ]] && gzip -c "/tmp/prof-$1/step.hlo.txt" > "$OUT/prof-$1.hlo.txt.gz"
}
SMALL=(train --config gpt3-small --batch 16 --steps 10)
py 90 "${SMALL[@]}" --profile /tmp/prof-small; keep_trace small
if grep -q '"failed"' "$RES"; then tail -n 60 "$LOG"; exit 1; fi
py 90 train --config gpt3-medium --batch 16 --steps 6 --peak no --profile /tmp/prof-medium; keep_trace medium
py 60 "${SMALL[@]}" --peak no model.scan_layers=false
py 60 "${SMALL[@]}" --peak no model.loss_chunk=0
py 60 "${SMALL[@]}" --peak no model.loss_chunk=2048
py 60 train --config gpt3-small --batch 32 --steps 6 --peak no
py 60 "${SMALL[@]}" --peak no "train.xla_flags=auto --xla_gpu_enable_triton_gemm=false"
py 90 train --config gpt3-xl --batch 8 --steps 6 --peak no model.scan_layers=false
summary | tee -a "$LOG"
if grep -q '"failed"' "$RES"; then echo "--- log tail (a run failed)"; tail -n 40 "$LOG"; fi
