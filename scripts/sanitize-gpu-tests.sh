#!/usr/bin/env bash
# Runs every bundled GPU test binary under compute-sanitizer, one test thread each, and
# prints each run's summary. Lives in the GPU bundle (scripts/gpu-bundle.sh).
#   sanitize-gpu-tests.sh [memcheck] [racecheck] [synccheck]   (default: memcheck racecheck)
# SANITIZER_TIMEOUT (s, default 300) bounds each binary; SANITIZER_ARGS adds options (e.g.
# racecheck's `--kernel-name-exclude kns=nvjet`: cuBLASLt's Hopper kernels synchronise
# through mbarriers, which racecheck does not model); SANITIZER_TESTS picks binaries
# (default: all); logs go to $OUT or ./sanitizer-logs.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${OUT:-$here/sanitizer-logs}"
mkdir -p "$logs"
export RADIX_SPARSE_FIXTURES="${RADIX_SPARSE_FIXTURES:-$here/fixtures}"
sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
clean=0; dirty=0
for tool in ${*:-memcheck racecheck}; do
  for name in ${SANITIZER_TESTS:-$(ls "$here/tests")}; do
    t="$here/tests/$name"
    log="$logs/$tool-$name.log"
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout "${SANITIZER_TIMEOUT:-300}" "$sanitizer" --tool "$tool" --error-exitcode 99 \
      --print-limit 50 ${SANITIZER_ARGS:-} "$t" --test-threads=1 >"$log" 2>&1
    rc=$?
    summary="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY' "$log" | tail -1)"
    tests="$(grep -E '^test result' "$log" | tail -1)"
    case $rc in
      0) status=CLEAN; clean=$((clean + 1)) ;;
      124) status=TIMEOUT; dirty=$((dirty + 1)) ;;
      99) status=ERRORS; dirty=$((dirty + 1)) ;;
      *) status="RC=$rc"; dirty=$((dirty + 1)) ;;
    esac
    printf '%-9s %-8s %-28s %4ss  %s | %s\n' "$tool" "$status" "$name" \
      "$(( $(date +%s) - start ))" "${summary:-no summary}" "${tests:-no test result}"
  done
done
echo "compute-sanitizer: $clean clean, $dirty not clean"
[ "$dirty" -eq 0 ]
