#!/usr/bin/env bash
# The suite must pass while something else uses the CPUs (issue 11): run it N times (default 2)
# back to back beside a CPU hog -- one busy loop per core (stress-ng --cpu when installed) --
# and stop at the first failure. Extra arguments go to pytest.
#   bash scripts/test-under-load.sh            # twice, the whole suite
#   RUNS=3 bash scripts/test-under-load.sh -x  # three times, stop a run at its first failure
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-2}
CORES=$(nproc)
HOGS=()
if command -v stress-ng >/dev/null 2>&1; then
  stress-ng --cpu "$CORES" --quiet &
  HOGS+=($!)
  HOG_DESC="stress-ng --cpu $CORES"
else
  for _ in $(seq 1 "$CORES"); do
    bash -c 'while :; do :; done' &
    HOGS+=($!)
  done
  HOG_DESC="$CORES busy shell loops"
fi
trap 'kill "${HOGS[@]}" 2>/dev/null; wait "${HOGS[@]}" 2>/dev/null || true' EXIT
echo "==> CPU hog beside the suite: $HOG_DESC"
for i in $(seq 1 "$RUNS"); do
  echo "==> loaded run $i of $RUNS"
  start=$(date +%s)
  .venv/bin/pytest -q -p no:cacheprovider "$@"
  echo "==> loaded run $i passed in $(( $(date +%s) - start )) s"
done
