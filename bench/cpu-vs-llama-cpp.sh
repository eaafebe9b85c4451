#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Q4_1 GGUF) on this machine's CPU: our prefill and decode beside
# llama.cpp's on the same file, one after the other in one run; appends both to
# bench/results.jsonl (bench/record.py pairs them).
#
#   pip install --target /tmp/llamacpp llama-cpp-python==0.3.16   # builds llama.cpp
#   cargo build --release -p radix-sparse && tools/fetch_smollm2.sh
#   LLAMA_CPP_PYTHONPATH=/tmp/llamacpp bench/cpu-vs-llama-cpp.sh [PROMPT_TOKENS [DECODE_TOKENS]]
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin="${RADIX_SPARSE_BIN:-target/release/radix-sparse}"
prompt="${1:-512}"
decode="${2:-128}"
threads="$(nproc)"
device="cpu ($threads cores)"
shape="SmolLM2-135M-Instruct Q4_1 GGUF, one sequence, prompt $prompt, decode $decode"
load="$(cut -d" " -f1 /proc/loadavg)" # the machine may be shared: noted with the rows
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$bin" bench offline --model "$model" --device cpu --dataset "random:$prompt:$decode" \
  --num-prompts 1 --temperature 0 --json "$tmp/offline.jsonl"
python3 - "$tmp/offline.jsonl" "$tmp/ours.jsonl" "$shape" "$device" <<'PY'
import json, sys
o = json.loads(open(sys.argv[1]).read().splitlines()[-1])
x = o["extra"]
steps = sum(x["decode_steps_by_batch"].values())
secs = sum(x["decode_s_by_batch"].values())
rows = [
    {"benchmark": "cpu_prefill", "shape": sys.argv[3], "ours": x["input_tokens"] / x["prefill_s"],
     "unit": "tok/s", "device": sys.argv[4], "extra": {"prefill_s": x["prefill_s"]}},
    {"benchmark": "cpu_decode", "shape": sys.argv[3], "ours": steps / secs, "unit": "tok/s",
     "device": sys.argv[4], "extra": {"decode_steps": steps, "decode_s": secs}},
]
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(f"radix-sparse: prefill {rows[0]['ours']:.1f} tok/s, decode {rows[1]['ours']:.1f} tok/s")
PY
PYTHONPATH="${LLAMA_CPP_PYTHONPATH:-}" python3 bench/peers/llama_cpp_cpu.py "$model" \
  --prompt-tokens "$prompt" --decode-tokens "$decode" --threads "$threads" --shape "$shape" \
  --out "$tmp/peer.jsonl"
python3 bench/record.py --ours "$tmp/ours.jsonl" --peer "$tmp/peer.jsonl" \
  --command "bench/cpu-vs-llama-cpp.sh $prompt $decode (ours: radix-sparse bench offline --model $model --device cpu --dataset random:$prompt:$decode --num-prompts 1 --temperature 0; peer: bench/peers/llama_cpp_cpu.py, $threads threads)" \
  --note "same GGUF; ours dequantizes to f32 at load and computes in f32 (gemm crate), llama.cpp computes on the Q4_1/Q8_0 blocks; 1-minute load average $load at the start"
