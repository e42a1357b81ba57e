# Shared by bench/gpu.sh and bench/gpu_profile.sh (sourced, not run): the run helper and the
# summary table. Expects OUT, BUDGET, RES, LOG, START and (optionally) SMOKE, TINY.

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
