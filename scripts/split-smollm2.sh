#!/usr/bin/env bash
# SmolLM2's GGUF (98 MB) is larger than one GPU call carries (64 MiB), so it travels in
# two halves, one call each, into git-ignored folders that stay on a warm GPU machine
# between calls (`carry: ["gpu-model/a"]`, then `carry: ["gpu-model/b"]`, then the
# bundle). There, run-gpu-tests.sh joins them, checks the SHA-256 and points the
# SmolLM2 GPU test at the file.
set -euo pipefail
cd "$(dirname "$0")/.."
src=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$src" ] || tools/fetch_smollm2.sh
rm -rf gpu-model
mkdir -p gpu-model/a gpu-model/b
half=$(( ($(stat -c %s "$src") + 1) / 2 ))
head -c "$half" "$src" >gpu-model/a/part
tail -c +"$(( half + 1 ))" "$src" >gpu-model/b/part
sha256sum "$src" | cut -d' ' -f1 >gpu-model/a/sha256
ls -l gpu-model/a gpu-model/b
