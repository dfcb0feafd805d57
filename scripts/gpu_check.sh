#!/usr/bin/env bash
# One command for everything that waits for a GPU, built for a bare offline node (no index, no hub): it installs
# ./wheelhouse (`make wheelhouse`) with `pip --no-index --no-deps --target .gpu-check/site` onto PYTHONPATH, then
# runs each step under its own time budget, all under a DEADLINE_S of 450 s (whole check < 8 minutes):
#   wheels, deps                               the offline install; what is imported against what the node should have
#   pytest_cuda                                the CUDA-only tests (full-model flex, bf16, backward)
#   flex_vs_sdpa                               0.5B shape: logits + gradients, block / block_clean (block, causal clean
#                                              context) / block_clean + document mask
#   bench_train_causal_sdpa, _block_clean_flex dlm bench-train at L 2048, bf16: tokens/s and MFU
#   decode_<shape>[_compile]                   dlm bench on the 0.5B and SmolLM2-135M shapes (random weights, bf16):
#                                              lean AR vs fixed TPF 2/3/4 and threshold 0.9, batch 1 and 8, forward
#                                              cost for 1-64 query tokens; decode.compile off, then on
# Each step's rc, seconds and budget go to $OUT_DIR/steps.tsv as it ends, its output beside it; report.json +
# report.md gather them. Refuses in one line without CUDA, writing nothing.
#   make gpu-check                   or: OUT_DIR=... STEPS=flex_vs_sdpa,decode_smollm2-135m bash scripts/gpu_check.sh
#   GPU_CHECK_REHEARSAL=1            the CPU rehearsal (make gpu-check-rehearsal): no CUDA gate, tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
[ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
command -v "$PY" > /dev/null || { echo "error: PY=$PY: no such python; allowed: a python with torch" \
  "(default: .venv/bin/python, else python3; make gpu-check PY=...)" >&2; exit 2; }
OUT_DIR=${OUT_DIR:-outputs/gpu_check}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
SITE=${SITE:-.gpu-check/site}
STEPS=${STEPS:-}                  # comma-separated step names to run (a rerun of what failed); empty: all
DEADLINE_S=${DEADLINE_S:-450}
TRAIN_STEPS=${TRAIN_STEPS:-20}
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1

[ "$REHEARSAL" = 1 ] || $PY scripts/gpu_check.py require-cuda || exit 2
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.tsv"
step() {  # step NAME BUDGET_S LOG COMMAND...: run under min(budget, time left), keep going on failure, record it
  local name=$1 budget=$2 log=$3; shift 3
  [ -z "$STEPS" ] || [[ ",$STEPS," == *",$name,"* ]] || return 0
  local left=$((DEADLINE_S - SECONDS)) start=$SECONDS rc
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >> "$OUT_DIR/steps.tsv"
    echo "== $name: skipped, ${left}s left of DEADLINE_S=$DEADLINE_S"
    return 0
  fi
  echo "== $name (budget ${budget}s)"
  timeout -k 5 "$budget" "$@" > "$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$budget" >> "$OUT_DIR/steps.tsv"
  tail -n 5 "$log"
}
install_wheels() {  # the wheelhouse into $SITE, offline; reused while the same wheels and python ask for it
  if [ ! -d "$WHEELHOUSE" ]; then echo "no $WHEELHOUSE/: the environment of $PY as it is"; return 0; fi
  local want
  want="$($PY -V 2>&1) $(cat scripts/wheelhouse.txt) $(ls "$WHEELHOUSE")"
  if [ -f "$SITE/.installed" ] && [ "$(cat "$SITE/.installed")" = "$want" ]; then echo "$SITE: up to date"; return 0; fi
  rm -rf "$SITE" && mkdir -p "$SITE" || return 1
  if $PY -m pip --version > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELHOUSE" --target "$SITE" \
      -r scripts/wheelhouse.txt || return 1
  else  # no pip on the node: a wheel is a zip of what goes into site-packages
    for w in "$WHEELHOUSE"/*.whl; do $PY -m zipfile -e "$w" "$SITE" || return 1; done
  fi
  printf '%s' "$want" > "$SITE/.installed"
  ls "$SITE"
}
[[ "$SITE" = /* ]] || SITE=$PWD/$SITE
export PY WHEELHOUSE SITE PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the wheels shadow the node's copies
export -f install_wheels

PRESETS=experiments
TRAIN_LENGTH=2048 FLEX_SEQ_LEN=1024 FLEX=flex BATCHES=1,8 PROMPTS=8 NEW_TOKENS=64 REPEATS=1
if [ "$REHEARSAL" = 1 ]; then  # tiny shapes, CPU; flex has no backward on CPU (sdpa / eager stand in for it)
  PRESETS=$OUT_DIR/presets TRAIN_LENGTH=64 FLEX_SEQ_LEN=128 FLEX=sdpa TRAIN_STEPS=4
  BATCHES=1,2 PROMPTS=2 NEW_TOKENS=32 REPEATS=1
  export TORCH_COMPILE_DISABLE=1  # the --compile flag and its code path run; inductor on CPU is not the point here
fi
QWEN=$PRESETS/qwen2.5-0.5b-random.yaml
SMOL=$PRESETS/smollm2-135m-random.yaml
DATA_CACHE=${SITE%/*}/data  # the packed training rows, beside the installed wheels rather than in OUT_DIR
TRAIN=("data.cache_dir=$DATA_CACHE" "data.max_length=$TRAIN_LENGTH" data.batch_size=4 trainer.precision=bf16-true)
# decode: 8 prompts (5-shot: a few-shot evaluation's prompt length), 64 tokens (2 blocks of 32), EOS ignored
DECODE=(--batch-sizes "$BATCHES" --dtype bfloat16 --block-size 32 --few-shot 5 --num-prompts "$PROMPTS"
        --max-new-tokens "$NEW_TOKENS" --ignore-eos --thresholds 0.9 --tokens-per-pass 2,3,4 --no-cache-thresholds ''
        --no-one-token-reference --no-hf-generate --repeats "$REPEATS" --warmup 1 --forward-costs 1,2,4,8,16,32,64
        --forward-cost-context 512)

step wheels 30 "$OUT_DIR/wheels.log" bash -c install_wheels
[ "$REHEARSAL" = 1 ] && $PY scripts/gpu_check.py rehearsal-presets "$PRESETS" > /dev/null
step deps 20 "$OUT_DIR/deps.log" $PY scripts/gpu_check.py deps "$OUT_DIR/deps.json"
mapfile -t CUDA_TESTS < <(grep -rlF --include='test_*.py' 'pytest.mark.cuda' tests | sort)
step pytest_cuda 90 "$OUT_DIR/pytest_cuda.txt" $PY -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}"
step flex_vs_sdpa 75 "$OUT_DIR/flex.log" $PY scripts/gpu_check.py flex "$OUT_DIR/flex.json" "$QWEN" "$FLEX_SEQ_LEN"
step bench_train_causal_sdpa 75 "$OUT_DIR/bench_train_causal_sdpa.md" $PY -m dlm.cli.main bench-train "$QWEN" \
  "${TRAIN[@]}" attention.backend=sdpa --patterns causal --steps "$TRAIN_STEPS"
step bench_train_block_clean_flex 90 "$OUT_DIR/bench_train_block_clean_flex.md" $PY -m dlm.cli.main bench-train \
  "$QWEN" "${TRAIN[@]}" attention.backend=$FLEX --patterns block_clean --steps "$TRAIN_STEPS"
step decode_qwen2.5-0.5b 75 "$OUT_DIR/decode_qwen2.5-0.5b.log" $PY -m dlm.cli.main bench "$QWEN" \
  "${DECODE[@]}" --output-dir "$OUT_DIR/decode_qwen2.5-0.5b"
step decode_smollm2-135m 75 "$OUT_DIR/decode_smollm2-135m.log" $PY -m dlm.cli.main bench "$SMOL" \
  "${DECODE[@]}" --output-dir "$OUT_DIR/decode_smollm2-135m"
# compile (CUDA graphs) last: inductor's first compile of each shape is the slowest part of the check
step decode_smollm2-135m_compile 120 "$OUT_DIR/decode_smollm2-135m_compile.log" $PY -m dlm.cli.main bench "$SMOL" \
  "${DECODE[@]}" --compile --output-dir "$OUT_DIR/decode_smollm2-135m_compile"
step decode_qwen2.5-0.5b_compile 120 "$OUT_DIR/decode_qwen2.5-0.5b_compile.log" $PY -m dlm.cli.main bench "$QWEN" \
  "${DECODE[@]}" --compile --output-dir "$OUT_DIR/decode_qwen2.5-0.5b_compile"
$PY scripts/gpu_check.py report "$OUT_DIR"
echo "gpu-check: ${SECONDS}s"
! grep -qv $'\t0\t' "$OUT_DIR/steps.tsv"   # exit non-zero when any step failed or was skipped
