# Shared by gptjax/bench/gpu.sh and gpu_profile.sh (sourced after they set BUDGET): the results
# files, the environment, the run helper and the summary table.
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
if [[ -z "${SMOKE:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then  # gptjax/bench/gpu_carry.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gptjax-site .whl/*.whl && export PYTHONPATH="/tmp/gptjax-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -f .bpe/r50k_base.tiktoken ]]; then export GPTJAX_GPT2_BPE="$PWD/.bpe/r50k_base.tiktoken"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
RES="$OUT/gpu-results.jsonl" LOG="$OUT/gpu-bench.log"
: > "$RES"
START=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} >> "$LOG" 2>&1
# SMOKE=1 runs the same runs on a tiny model (CPU, tests): the plumbing, not the figures.
TINY=(model.n_layer=2 model.d_model=32 model.n_head=2 model.d_ff=64 model.context_length=64
      model.local_window=16 model.vocab_size=512 mesh.data=1 mesh.fsdp=1)

py() {  # py TIMEOUT ARGS...: one benchmark process, its JSON line appended to $RES
  local left=$((BUDGET - (SECONDS - START)))
  local args=("${@:2}")
  if [[ -n "${SMOKE:-}" ]]; then args+=("${TINY[@]}"); fi
  # Skip a run with less than half its own limit (and under 30 s) left: it would only time out.
  local floor=$(( $1 / 2 > 30 ? $1 / 2 : 30 ))
  if (( left < floor )); then record skipped "${args[*]}"; return; fi
  local t=$(( $1 < left ? $1 : left ))
  echo "== $(date +%T) [${t}s] ${args[*]}" >> "$LOG"
  timeout "$t" python3 -m gptjax.bench "${args[@]}" --json > "$OUT/last.json" 2>> "$LOG"
  local rc=$?
  if (( rc == 0 )); then tail -n 1 "$OUT/last.json" >> "$RES"
  else record failed "${args[*]}" "$rc"; fi
}
record() {  # record failed|skipped ARGS [RC]: one JSON line in $RES
  python3 -c 'import json, sys; d = {sys.argv[1]: sys.argv[2]}
if len(sys.argv) > 3: d["rc"] = int(sys.argv[3])
print(json.dumps(d))' "$@" >> "$RES"
}
finish() {  # the summary; with a failed run, the log's tail and exit status 1
  summary | tee -a "$LOG"
  if grep -q '"failed"' "$RES"; then echo "--- log tail (a run failed)"; tail -n 40 "$LOG"; exit 1; fi
}
summary() {  # the table of every row of $RES, failures and skips as they are
  python3 -m gptjax.bench.gpu_summary "$RES"
}
