#!/usr/bin/env bash
# `make gpu-check-rehearsal`: scripts/gpu_check.sh on CPU in a clean venv that holds only the GPU node's packages
# (scripts/gpu_node_packages.txt at its versions; $TORCH, the local CPU wheel, stands in for the CUDA build) plus the
# wheelhouse installed offline, every step at tiny shapes: a missing import or a broken flag fails here, not on the
# node. The local CPU torch wheel is cp311 only, so the venv is Python 3.11 with the cp311 wheels of the same pins;
# the node's own cp312 wheelhouse is downloaded too (`make wheelhouse`: it resolves and fits).
#   REHEARSAL_DIR=.gpu-check/rehearsal  PYTHON=python3.11  TORCH=torch==2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
R=${REHEARSAL_DIR:-.gpu-check/rehearsal}
PYTHON=${PYTHON:-python3.11}
TORCH=${TORCH:-torch==2.13.0}
VENV=$R/venv
mkdir -p "$R"

echo "== wheelhouse/ for the node (cp312), $R/wheelhouse for the rehearsal (cp311)"
bash scripts/wheelhouse.sh
PY_VERSION=3.11 WHEELHOUSE=$R/wheelhouse bash scripts/wheelhouse.sh

stamp="$PYTHON $TORCH $(cat scripts/gpu_node_packages.txt)"
if [ ! -f "$VENV/.node" ] || [ "$(cat "$VENV/.node")" != "$stamp" ]; then
  echo "== a clean venv of the node's packages ($VENV)"
  rm -rf "$VENV"
  $PYTHON -m venv "$VENV"
  grep -v "gpu-only" scripts/gpu_node_packages.txt > "$R/node-cpu.txt"
  "$VENV/bin/python" -m pip install -q "$TORCH" -r "$R/node-cpu.txt" 2> >(grep -v "^WARNING: Location" >&2)
  printf '%s' "$stamp" > "$VENV/.node"
fi

echo "== scripts/wheelhouse.txt against what pip resolves for the check beyond the node's packages"
mapfile -t needed < <("$VENV/bin/python" scripts/gpu_check.py requirements)
"$VENV/bin/python" -m pip install -q --dry-run --report "$R/missing.json" -c scripts/wheelhouse.txt "${needed[@]}" \
  2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" scripts/gpu_check.py wheelhouse-matches "$R/missing.json"

echo "== scripts/gpu_check.sh, CPU, tiny shapes, no network"
offline=()
unshare -n true 2> /dev/null && offline=(unshare -n)  # a network namespace of its own: nothing can be fetched
rm -rf "$R/out"
"${offline[@]}" env GPU_CHECK_REHEARSAL=1 PY="$VENV/bin/python" WHEELHOUSE="$R/wheelhouse" SITE="$R/site" \
  OUT_DIR="$R/out" bash scripts/gpu_check.sh

echo "== dlm train with tracking on, where mlflow is missing: one line"
err=$(PYTHONPATH="$PWD/$R/site:$PWD" "$VENV/bin/python" -m dlm.cli.main train "$R/out/presets/smollm2-135m-random.yaml" \
      2>&1 >/dev/null || true)
expected="error: tracking.enabled=True: mlflow is not installed; allowed: false (metrics to <output_dir>/metrics/metrics.csv)"
[ "$err" = "$expected" ] || { echo "expected: $expected"$'\n'"got: $err" >&2; exit 1; }
steps=$(wc -l < "$R/out/steps.tsv")
echo "gpu-check-rehearsal: every step and the one-line refusal passed in ${SECONDS}s"
echo "rehearsal: $((steps + 1)) passed, 0 failed"  # the plain closing line CI reads
