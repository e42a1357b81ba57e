#!/usr/bin/env bash
# Every GPU measurement in one go, for one device call of under 8 minutes on one H100/H200.
# Results: $OUT/gpu-results.jsonl (one JSON object per run, each with its provenance: commit,
# GPU, driver, versions, flags, command, date; {"failed": ...} for a run that did not finish),
# the full log in $OUT/gpu-bench.log, a summary table at the end of stdout. Commit the rows as
# results/<device>-<date>.jsonl and add their tables to gptjax/bench/report.py: the docs' GPU
# figures come from those files.
#   on the device machine, from the repo root:  bash gptjax/bench/gpu.sh
# JAX, flax, optax, orbax, torch and transformers are on that machine; TensorFlow is not (the
# benchmarks use synthetic batches; the as-run row, the thread pipeline). Runs go most important
# first; once BUDGET seconds have passed the rest are skipped (and listed), so the call ends
# inside its limit. Two things travel with the call (both in .git/info/exclude; name them in
# `carry`), made here once by `bash gptjax/bench/gpu_carry.sh`: .whl/ (wheels the GPU image lacks:
# tensorboardX) and .bpe/r50k_base.tiktoken (the GPT-2 BPE ranks, for the as-run row).
set -uo pipefail
BUDGET="${BUDGET:-450}"
source "$(dirname "$0")/gpu_lib.sh"
LONG_PROMPT=1536 LONG_NEW=512 TTFT_PROMPT=1024 TORCH_MODES="${TORCH_MODES:-default,max-autotune}"
RUN_STEPS=200 RUN_LOG=20 RUN_DATA=()
if [[ -n "${SMOKE:-}" ]]; then
  # torch uncompiled: the plumbing; test_bench's torch comparison runs torch.compile
  LONG_PROMPT=48 LONG_NEW=16 TTFT_PROMPT=32 TORCH_MODES=eager RUN_STEPS=6 RUN_LOG=2
  RUN_DATA=(data.tokenizer=byte)  # the tiny model's vocabulary of 512 holds bytes, not BPE
fi

# TRAIN_ONLY=1 runs the train-step rows alone (1, 3, 4).
# 1. gpt3-small at 2048 as GPT-3 has it (dense/local); MFU by PaLM's convention against 989.
py 120 train --config gpt3-small --batch 16 --steps 10
# A first run that fails is plumbing (an API the GPU image's JAX changed, say): stop and show it,
# so the rest of the device time is not spent failing the same way.
if grep -q '"failed"' "$RES"; then tail -n 60 "$LOG"; exit 1; fi
# 2. decode: batch 1 latency and batch 64 throughput, prompt 128 + 128 (a cache of 2048 of
#    which each step reads the 256-position bucket the text needs).
[[ -z "${TRAIN_ONLY:-}" ]] && py 100 decode --config gpt3-small --batch-sizes 1,64
# 2b. the same with 8 decode steps per iteration of the device loop (sampling.DECODE_UNROLL is 1
#    until this says more is faster): fewer reads of the loop's condition by the host.
[[ -z "${TRAIN_ONLY:-}" ]] && py 100 decode --config gpt3-small --batch-sizes 1,64 --unroll 8
# 3. like for like with the PyTorch peers (nanoGPT-style, best of TORCH_MODES; Hugging Face
#    GPT-2), torch.compile'd, all-dense attention on both sides, in this same call.
py 300 train --config gpt3-small --batch 16 --steps 10 --compare-torch --torch-modes "$TORCH_MODES" model.attention_pattern=dense
# 4. larger models; xl keeps the least recomputation that fits the card.
py 100 train --config gpt3-medium --batch 16 --steps 8 --remat auto
py 150 train --config gpt3-xl --batch 8 --steps 6 --remat auto
# 4b. Training as train.py runs it (with the BPE ranks carried): the stdlib in GPT-2 BPE
#    through the thread pipeline (no TensorFlow on the GPU image), the host loop, an evaluation
#    and a checkpoint; its tokens/s against row 1's (issue 18: within 3%).
if [[ -n "${GPTJAX_GPT2_BPE:-}" || -n "${SMOKE:-}" ]]; then
  [[ -z "${TRAIN_ONLY:-}" ]] && py 180 run --config gpt3-small --batch 16 --steps "$RUN_STEPS" --log-every "$RUN_LOG" train.microbatches=1 optim.ramp_tokens=0 train.eval_batches=8 "${RUN_DATA[@]}"
else
  record skipped "run: no GPT-2 BPE ranks (carry .bpe/r50k_base.tiktoken, see the header)"
fi
# 5. decode deep into the context: prompt 1536 + 512, every step reading the 2048 cache.
[[ -z "${TRAIN_ONLY:-}" ]] && py 100 decode --config gpt3-small --batch-sizes 1,64 --prompt-len "$LONG_PROMPT" --new-tokens "$LONG_NEW"
# 6. time to the first token of a 1,024-token prompt at batch 1 (issue 18: target <= 5 ms).
[[ -z "${TRAIN_ONLY:-}" ]] && py 60 decode --config gpt3-small --batch-sizes 1 --prompt-len "$TTFT_PROMPT" --new-tokens 2
# 6b. row 5 again with cuDNN's fused attention for the one-token step
#    (model.decode_attention_impl: xla until this says cudnn is faster; the row also reports its
#    largest difference from the xla step, step_attention_max_error). Off a GPU (SMOKE) cudnn
#    falls back to xla, with a warning.
[[ -z "${TRAIN_ONLY:-}" ]] && py 100 decode --config gpt3-small --batch-sizes 1,64 --prompt-len "$LONG_PROMPT" --new-tokens "$LONG_NEW" model.decode_attention_impl=cudnn
# 7. the XLA flags' effect: run 1 again without them.
[[ -z "${TRAIN_ONLY:-}" ]] && py 90 train --config gpt3-small --batch 16 --steps 10 train.xla_flags=none

finish
