#!/usr/bin/env bash
# One command for everything that waits for a GPU (under 8 minutes on one GPU):
#   1. pytest -m cuda                          the CUDA-only tests (full-model flex, bf16, backward)
#   2. flex vs sdpa, 0.5B shape               logits + gradients, block / block_clean / block_clean + document mask
#   3. dlm bench-train at L 2048, bf16         causal under sdpa vs block_clean under flex, tokens/s and MFU
#   4. dlm bench, random-weight 0.5B shape     the cached decoder vs AR; $DECODE_FLAGS adds decoder flags
# and writes $OUT_DIR/report.json + report.md. Refuses in one line without CUDA.
#   make gpu-check                             or: OUT_DIR=outputs/gpu_check DECODE_FLAGS="..." bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
[ -x .venv/bin/python ] && [ "$PY" = python ] && PY=.venv/bin/python
OUT_DIR=${OUT_DIR:-outputs/gpu_check}
# the decode-engine table on CUDA: fixed TPF 2/3/4, cache vs no-cache at 256 tokens, CUDA graphs, bf16, block 32,
# 5-shot prompts (a few-shot evaluation's prompt length, where the cache pays most)
DECODE_FLAGS=${DECODE_FLAGS:---tokens-per-pass 2,3,4 --no-cache-tokens-per-pass 4 --compile --dtype bfloat16 \
--block-size 32 --few-shot 5 --forward-costs 1,4,8,16,32,64 --forward-cost-context 512}
TRAIN_STEPS=${TRAIN_STEPS:-30}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

$PY scripts/gpu_check.py require-cuda || exit 2
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.tsv"
step() {  # step NAME LOG COMMAND...: run, keep going on failure, record rc and seconds
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  echo "== $name"
  "$@" > "$log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT_DIR/steps.tsv"
  tail -n 5 "$log"
}

TRAIN=(experiments/qwen2.5-0.5b-random.yaml "data.cache_dir=$OUT_DIR/data" data.max_length=2048 data.batch_size=4
       trainer.precision=bf16-true)
step pytest_cuda "$OUT_DIR/pytest_cuda.txt" $PY -m pytest -q -m cuda -p no:cacheprovider
step flex_vs_sdpa "$OUT_DIR/flex.log" $PY scripts/gpu_check.py flex "$OUT_DIR/flex.json"
step bench_train_causal_sdpa "$OUT_DIR/bench_train_causal_sdpa.md" $PY -m dlm.cli.main bench-train "${TRAIN[@]}" \
  attention.backend=sdpa --patterns causal --steps "$TRAIN_STEPS"
step bench_train_block_clean_flex "$OUT_DIR/bench_train_block_clean_flex.md" $PY -m dlm.cli.main bench-train \
  "${TRAIN[@]}" attention.backend=flex --patterns block_clean --steps "$TRAIN_STEPS"
step random_checkpoint "$OUT_DIR/checkpoint.log" $PY scripts/gpu_check.py checkpoint "$OUT_DIR/random_0.5b"
# shellcheck disable=SC2086  # DECODE_FLAGS is a list of flags
step bench_decode "$OUT_DIR/bench.log" $PY -m dlm.cli.main bench "$OUT_DIR/random_0.5b" --thresholds 0.9 \
  --batch-sizes 1,4 --max-new-tokens 256 --ignore-eos --no-cache-thresholds '' --repeats 2 --num-prompts 4 \
  --output-dir "$OUT_DIR/bench" $DECODE_FLAGS
$PY scripts/gpu_check.py report "$OUT_DIR"
! grep -qv $'\t0\t' "$OUT_DIR/steps.tsv"   # exit non-zero when any step failed
