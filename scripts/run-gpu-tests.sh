#!/usr/bin/env bash
# Runs every bundled GPU test binary and prints a pass/fail summary. Lives in the GPU
# bundle (scripts/gpu-bundle.sh). Logs go to $OUT (if set) or ./gpu-test-logs.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${OUT:-$here/gpu-test-logs}"
mkdir -p "$logs"
# The HF parity fixtures travel in the bundle (tests otherwise look in the source tree).
export RADIX_SPARSE_FIXTURES="${RADIX_SPARSE_FIXTURES:-$here/fixtures}"
pass=0; fail=0; failed=()
for t in "$here"/tests/*; do
  name="$(basename "$t")"
  start=$(date +%s)
  if "$t" --test-threads="${GPU_TEST_THREADS:-4}" "$@" >"$logs/$name.log" 2>&1; then
    status=PASS; pass=$((pass + 1))
  else
    status=FAIL; fail=$((fail + 1)); failed+=("$name")
  fi
  printf '%-4s %-40s %4ss  %s\n' "$status" "$name" "$(( $(date +%s) - start ))" \
    "$(grep -E '^test result' "$logs/$name.log" | tail -1)"
done
echo "GPU tests: $pass binaries passed, $fail failed"
for f in "${failed[@]}"; do
  echo "--- $f (failures) ---"
  grep -E -A25 '^failures:|panicked at' "$logs/$f.log" | head -60
done
[ "$fail" -eq 0 ]
