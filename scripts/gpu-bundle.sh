#!/usr/bin/env bash
# Builds the release CLI and the release GPU test binaries (`--features cuda`), and
# collects them with a runner script, the peer benchmark scripts and bench/record.py
# into one git-ignored folder. A GPU host without Rust then runs
#   ./gpu-bundle/run-gpu-tests.sh
# and gets a pass/fail summary. The folder must stay under 64 MiB (the device tool's
# carry limit): release builds, no debug info.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bundle}
rm -rf "$out"
mkdir -p "$out/tests" "$out/bench"

cargo build --release -p radix-sparse --features cuda
cp target/release/radix-sparse "$out/"

# Every integration test target named gpu*, built with the cuda feature.
cargo test --release --workspace --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil, os
out = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    if target["kind"] == ["test"] and target["name"].startswith("gpu"):
        pkg = msg["package_id"].split("#")[0].rsplit("/", 1)[-1].split("@")[0]
        dest = os.path.join(out, "tests", pkg + "-" + target["name"])
        shutil.copy(msg["executable"], dest)
        print("bundled", dest)
' "$out"

cp -r crates/model/tests/fixtures "$out/fixtures"
mkdir -p "$out/bench/datasets"
cp bench/datasets/*.json "$out/bench/datasets/"
cp bench/record.py "$out/bench/"
cp bench/peers/*.py "$out/bench/"
cp scripts/run-gpu-tests.sh "$out/run-gpu-tests.sh"
cp scripts/sanitize-gpu-tests.sh "$out/sanitize-gpu-tests.sh"
cp bench/run-gpu-benches.sh "$out/run-gpu-benches.sh"
# Symbols are not needed there and the carry limit is tight (the CLI alone is 22 MB with them).
strip "$out/radix-sparse" "$out"/tests/*
chmod +x "$out/run-gpu-tests.sh" "$out/sanitize-gpu-tests.sh" "$out/run-gpu-benches.sh" "$out/radix-sparse"
du -sh "$out"
