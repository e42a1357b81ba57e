#!/usr/bin/env bash
# Makes, here and once, what gptjax/bench/gpu.sh needs carried to the GPU machine (whose image has
# JAX and torch but neither TensorFlow nor tensorboardX, and no network): .whl/ with the
# tensorboardX wheel, and .bpe/r50k_base.tiktoken, the GPT-2 BPE ranks (from $GPTJAX_GPT2_BPE, else
# ../shared/data/). Both are added to .git/info/exclude; name them in the device call's carry:
#   carry [".whl", ".bpe"], command "bash gptjax/bench/gpu.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .whl .bpe
for d in /.whl/ /.bpe/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
version="$(python3 -c 'import importlib.metadata as m; print(m.version("tensorboardX"))')"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp -d .whl "tensorboardX==$version"
ranks="${GPTJAX_GPT2_BPE:-../shared/data/r50k_base.tiktoken}"
install -m 644 "$ranks" .bpe/r50k_base.tiktoken
ls -l .whl .bpe
