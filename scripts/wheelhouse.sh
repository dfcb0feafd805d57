#!/usr/bin/env bash
# `make wheelhouse`: the pinned wheels of scripts/wheelhouse.txt for the offline GPU node, binary only, no
# dependencies resolved (the list is the closure), into $WHEELHOUSE (default wheelhouse/, git-ignored).
#   PY_VERSION=3.12  PLATFORM="manylinux_2_28_x86_64 ..."  WHEELHOUSE=wheelhouse  WHEELHOUSE_MAX_MIB=56
# Refuses in one line, changing nothing, when the wheels come to more than WHEELHOUSE_MAX_MIB (the node receives at
# most 64 MiB of carried files in all). Otherwise $WHEELHOUSE holds exactly these wheels (older ones are removed).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
PY_VERSION=${PY_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
WHEELHOUSE_MAX_MIB=${WHEELHOUSE_MAX_MIB:-56}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in $PLATFORM; do platforms+=(--platform "$p"); done
# shellcheck disable=SC2086  # PIP may be "python -m pip"
if ! $PIP download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
     "${platforms[@]}" -d "$tmp/wheels" -r scripts/wheelhouse.txt 2> "$tmp/pip.err"; then
  grep -v "^WARNING: Location" "$tmp/pip.err" >&2  # this machine's pip config names index folders it may lack
  exit 1
fi
kib=$(du -sk "$tmp/wheels" | cut -f1)
mib=$(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }')
if [ "$kib" -gt $((WHEELHOUSE_MAX_MIB * 1024)) ]; then
  echo "error: WHEELHOUSE_MAX_MIB=$WHEELHOUSE_MAX_MIB: the wheels of scripts/wheelhouse.txt come to $mib MiB;" \
       "allowed: at most $WHEELHOUSE_MAX_MIB MiB (the GPU node receives 64 MiB of carried files in all)" >&2
  exit 2
fi
mkdir -p "$WHEELHOUSE"
rm -f "$WHEELHOUSE"/*.whl
mv "$tmp"/wheels/*.whl "$WHEELHOUSE"/
echo "$WHEELHOUSE/: $(ls "$WHEELHOUSE" | wc -l) wheels for cp${PY_VERSION/./} (${PLATFORM%% *}), $mib MiB"
