#!/usr/bin/env bash
# The embedded default, end to end on CPU. Run through `make demo` (which installs first).
set -euo pipefail
cd "$(dirname "$0")/.."
DLM=".venv/bin/dlm"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== attention patterns (L=8, block size 4)"
"$DLM" attention-demo --seq-len 8 --block-size 4
