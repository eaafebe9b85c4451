#!/usr/bin/env bash
# Runs every bundled GPU test binary and prints a pass/fail summary. Lives in the GPU
# bundle (scripts/gpu-bundle.sh). Logs go to $OUT (if set) or ./gpu-test-logs.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${OUT:-$here/gpu-test-logs}"
mkdir -p "$logs"
# The HF parity fixtures travel in the bundle (tests otherwise look in the source tree).
export RADIX_SPARSE_FIXTURES="${RADIX_SPARSE_FIXTURES:-$here/fixtures}"
# SmolLM2 arrives in two halves (scripts/split-smollm2.sh) beside the bundle.
model="$here/../gpu-model"
if [ -z "${RADIX_SPARSE_SMOLLM2:-}" ] && [ -f "$model/a/part" ] && [ -f "$model/b/part" ]; then
  cat "$model/a/part" "$model/b/part" >"$model/smollm2.gguf"
  if [ "$(sha256sum "$model/smollm2.gguf" | cut -d' ' -f1)" = "$(cat "$model/a/sha256")" ]; then
    export RADIX_SPARSE_SMOLLM2="$model/smollm2.gguf"
  else
    echo "gpu-model: the joined SmolLM2 file's SHA-256 differs (a half is stale?)"
  fi
fi
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
