# Shared by bench/gpu.sh and bench/gpu_profile.sh (sourced after they set BUDGET): the results
# files, the environment, the run helper and the summary table.
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
RES="$OUT/gpu-results.jsonl" LOG="$OUT/gpu-bench.log"
: > "$RES"
START=$SECONDS
# SMOKE=1 runs the same runs on a tiny model (CPU, tests): the plumbing, not the figures.
TINY=(model.n_layer=2 model.d_model=32 model.n_head=2 model.d_ff=64 model.context_length=64
      model.local_window=16 model.vocab_size=512 mesh.data=1 mesh.fsdp=1)

py() {  # py TIMEOUT ARGS...: one benchmark process, its JSON line appended to $RES
  local left=$((BUDGET - (SECONDS - START)))
  local args=("${@:2}")
  if [[ -n "${SMOKE:-}" ]]; then args+=("${TINY[@]}"); fi
  if (( left < 30 )); then echo "{\"skipped\": \"${args[*]}\"}" >> "$RES"; return; fi
  local t=$(( $1 < left ? $1 : left ))
  echo "== $(date +%T) [${t}s] ${args[*]}" >> "$LOG"
  timeout "$t" python3 -m gptjax.bench "${args[@]}" --json > "$OUT/last.json" 2>> "$LOG"
  local rc=$?
  if (( rc == 0 )); then tail -n 1 "$OUT/last.json" >> "$RES"
  else echo "{\"failed\": \"${args[*]}\", \"rc\": $rc}" >> "$RES"; fi
}
summary() {  # the table of every row of $RES, failures and skips as they are
  python3 "$(dirname "${BASH_SOURCE[0]}")/gpu_summary.py" "$RES"
}
