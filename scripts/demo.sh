#!/usr/bin/env bash
# The embedded default end to end on CPU (run through `make demo`, which installs first):
# tiny AR pretraining -> conversion to a block-diffusion LM -> generate -> bench -> eval -> tiny sweep -> report.
# Re-running continues where it stopped: finished training runs and sweep points are not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
DLM=".venv/bin/dlm"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }

step "attention patterns (L=8, block size 4)"
"$DLM" attention-demo --seq-len 8 --block-size 4 --patterns block block_clean

step "1/7 AR pretraining of a tiny Qwen3 from scratch (experiments/tiny_ar.yaml)"
"$DLM" train experiments/tiny_ar.yaml resume=true

step "2/7 conversion into a block-diffusion LM (experiments/tiny.yaml: block_clean, position masking)"
"$DLM" train experiments/tiny.yaml resume=true

step "3/7 generate"
"$DLM" generate outputs/tiny/final --max-new-tokens 32 \
  --prompt $'Question: Mia has 14 shells. Mia finds 5 more. How many shells does Mia have now?\nAnswer:'

step "4/7 bench: parallel decoding vs the AR baseline (accuracy vs tokens per forward)"
"$DLM" bench outputs/tiny/final --ar-baseline outputs/tiny_ar/final --thresholds 0.5,0.7,0.9,1.0 \
  --batch-sizes 1 --max-new-tokens 64 --repeats 1 --num-prompts 50 --output-dir outputs/bench/tiny

step "5/7 eval on the synthetic GSM8K-format task through lm-eval"
"$DLM" eval outputs/tiny/final --tasks gsm8k_synthetic --limit 100 --batch-size 1 --output outputs/eval/tiny.json

step "6/7 a tiny ablation sweep over the attention pattern"
"$DLM" sweep sweeps/attention_pattern_demo.yaml

step "7/7 sweep report"
"$DLM" report attention_pattern_demo

step "done in $(( $(date +%s) - START ))s. Browse every run with:"
echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000"
