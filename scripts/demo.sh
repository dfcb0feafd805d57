#!/usr/bin/env bash
# The embedded default end to end on CPU (run through `make demo`, which installs first):
# tiny AR pretraining -> conversion to a block-diffusion LM (and a joint AR + diffusion one) -> generate (threshold
# and lossless self-speculative) -> bench -> eval -> tiny sweep -> report.
# Re-running continues where it stopped: finished training runs and sweep points are not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
DLM=".venv/bin/dlm"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }

step "attention patterns (L=8, block size 4)"
"$DLM" attention-demo --seq-len 8 --block-size 4 --patterns block block_clean

step "1/8 AR pretraining of a tiny Qwen3 from scratch (experiments/tiny_ar.yaml)"
"$DLM" train experiments/tiny_ar.yaml resume=true

step "2/8 conversion into a block-diffusion LM (experiments/tiny.yaml: block_clean, position masking)"
"$DLM" train experiments/tiny.yaml resume=true

step "3/8 joint AR + diffusion conversion (experiments/tiny_joint.yaml: causal clean context, AR weight 1, diffusion 0.3)"
"$DLM" train experiments/tiny_joint.yaml resume=true

PROMPT=$'Question: Mia has 14 shells. Mia finds 5 more. How many shells does Mia have now?\nAnswer:'
step "4/8 generate: threshold decoding (tiny), then lossless self-speculative decoding (tiny_joint)"
"$DLM" generate outputs/tiny/final --max-new-tokens 32 --prompt "$PROMPT"
"$DLM" generate outputs/tiny_joint/final --max-new-tokens 32 --mode speculative --prompt "$PROMPT"

step "5/8 bench: parallel decoding vs the AR baseline (accuracy vs tokens per forward), then speculative decoding"
"$DLM" bench outputs/tiny/final --ar-baseline outputs/tiny_ar/final --thresholds 0.5,0.7,0.9,1.0 \
  --batch-sizes 1 --max-new-tokens 64 --repeats 1 --num-prompts 50 --output-dir outputs/bench/tiny
"$DLM" bench outputs/tiny_joint/final --thresholds 0.9 --speculative --no-hf-generate --no-one-token-reference \
  --no-cache-thresholds "" --batch-sizes 1 --max-new-tokens 64 --repeats 1 --num-prompts 50 \
  --output-dir outputs/bench/tiny_joint

step "6/8 eval on the synthetic GSM8K-format task through lm-eval"
"$DLM" eval outputs/tiny/final --tasks gsm8k_synthetic --limit 100 --batch-size 1 --output outputs/eval/tiny.json

step "7/8 a tiny ablation sweep over the attention pattern"
"$DLM" sweep sweeps/attention_pattern_demo.yaml

step "8/8 sweep report"
"$DLM" report attention_pattern_demo

step "done in $(( $(date +%s) - START ))s. Browse every run with:"
echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000"
