#!/usr/bin/env bash
# Registers, spills and SASS instruction mix of kernel specialisations, without a GPU:
#   scripts/kernel-report.sh [kernels compile args...]
# Needs NVRTC (RADIX_SPARSE_CUDA_LIB_DIRS) and, for the instruction mix, nvdisasm on PATH
# or in $NVDISASM (pip download nvidia-cuda-nvdisasm; any 13.x reads sm_90a cubins).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
RADIX_SPARSE_KERNEL_CACHE=$tmp cargo run -q -p radix-sparse -- kernels compile -v "$@" |
  awk '/^sm_/ {label=$2} /Compiling entry function/ {fn=$5} /Used [0-9]+ registers/ {print label, fn, $0} /spill stores/ {sp=$0} ' |
  sed "s/ptxas info    : //"
nvd=${NVDISASM:-$(command -v nvdisasm || true)}
if [ -n "$nvd" ]; then
  for f in "$tmp"/*.cubin; do
    echo "== $(basename "$f")"
    "$nvd" "$f" | grep -oE '^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9_.]+' | awk '{print $2}' | sed 's/\..*//' |
      sort | uniq -c | sort -rn | head -12 | tr '\n' ' '; echo
  done
fi
rm -rf "$tmp"
