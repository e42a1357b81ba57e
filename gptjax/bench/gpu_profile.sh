#!/usr/bin/env bash
# Where a train step's time goes on one GPU: profiler traces of gpt3-small and gpt3-medium (for
# python -m gptjax.bench.xplane_summary, here afterwards) and A/B variants against the presets,
# one change each (scan, the whole-logits loss, Triton GEMMs, batch, xl's remat), in one device
# call.
# Results as gpu.sh's ($OUT/gpu-results.jsonl, $OUT/gpu-bench.log) and
# $OUT/prof-<name>.xplane.pb.gz + .hlo.txt.gz per trace.
set -uo pipefail
BUDGET="${BUDGET:-270}"
source "$(dirname "$0")/gpu_lib.sh"
PROF=$(mktemp -d) || exit 1
trap 'rm -rf "$PROF"' EXIT
keep_trace() {  # keep_trace NAME: the trace and HLO that `--profile $PROF/NAME` wrote
  local pb; pb=$(find "$PROF/$1" -name '*.xplane.pb' | head -n 1)
  [[ -n "$pb" ]] && gzip -c "$pb" > "$OUT/prof-$1.xplane.pb.gz"
  [[ -f "$PROF/$1/step.hlo.txt" ]] && gzip -c "$PROF/$1/step.hlo.txt" > "$OUT/prof-$1.hlo.txt.gz"
}
SMALL=(train --config gpt3-small --batch 16 --steps 10)
py 90 "${SMALL[@]}" --profile "$PROF/small"; keep_trace small
if grep -q '"failed"' "$RES"; then tail -n 60 "$LOG"; exit 1; fi
py 90 train --config gpt3-medium --batch 16 --steps 6 --peak no --profile "$PROF/medium"; keep_trace medium
py 60 "${SMALL[@]}" --peak no model.scan_layers=true
py 60 "${SMALL[@]}" --peak no model.loss_chunk=0
py 60 "${SMALL[@]}" --peak no train.xla_flags=--xla_gpu_enable_latency_hiding_scheduler=true  # Triton GEMMs back
py 60 train --config gpt3-small --batch 32 --steps 6 --peak no
py 90 train --config gpt3-xl --batch 8 --steps 6 --peak no --remat none
py 90 train --config gpt3-xl --batch 8 --steps 6 --peak no --remat dots
finish
