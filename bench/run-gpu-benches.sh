#!/usr/bin/env bash
# Runs every benchmark beside its peer on the GPU host, from inside the GPU bundle
# (scripts/gpu-bundle.sh puts this file at gpu-bundle/run-gpu-benches.sh), and writes the
# paired rows to $OUT/results.jsonl (copy them into bench/results.jsonl).
#   run-gpu-benches.sh [gemm] [attention] [decode] [step] [offline] [sparse] [structured]
#                      [prefix] [latency] [sweep] [fp8|fp8gemm|fp8kv|fp8e2e] [allreduce]
#                      [prefill] [gemv] [pdl]
#                      (default: gemm attention decode step offline)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rs="$here/radix-sparse"
out="${OUT:-$here/out}"
mkdir -p "$out"
results="$out/results.jsonl"
phases="${*:-gemm attention decode step offline}"
record() { python3 "$here/bench/record.py" --out "$results" "$@" >/dev/null; }
# same_run_peer IN OUT LABEL [SHAPES]: our rows in IN become peer rows in OUT (a run of
# ours that is the baseline of another, in the same call); with SHAPES (our rows of the
# other run), row i takes the shape of row i there, when the two runs name their shapes
# differently (a lengths: dataset standing in for the one it was written from).
same_run_peer() {
  python3 - "$1" "$2" "$3" "${4:-}" <<'PY'
import json, sys
src, dst, label, shapes = sys.argv[1:5]
rows = [json.loads(line) for line in open(src)]
names = [json.loads(line)["shape"] for line in open(shapes)] if shapes else [r["shape"] for r in rows]
with open(dst, "w") as out:
    for r, shape in zip(rows, names):
        out.write(json.dumps({"benchmark": r["benchmark"], "shape": shape, "value": r["ours"],
                              "unit": r["unit"], "peer": label}) + "\n")
PY
}

# median_row OUT KEY IN...: the row of the IN files (one row each) whose KEY is the median.
median_row() {
  python3 - "$@" <<'PY'
import json, sys
out, key, *files = sys.argv[1:]
rows = sorted((json.loads(open(f).readline()) for f in files), key=lambda r: r[key])
open(out, "w").write(json.dumps(rows[len(rows) // 2]) + "\n")
PY
}

for phase in $phases; do
case $phase in
gemm)
  rm -f "$out/g_ours.jsonl" "$out/g_peer.jsonl"
  "$rs" bench gemm --json "$out/g_ours.jsonl"
  python3 "$here/bench/torch_gemm.py" --json "$out/g_peer.jsonl"
  record --ours "$out/g_ours.jsonl" --peer "$out/g_peer.jsonl" --command "radix-sparse bench gemm; bench/peers/torch_gemm.py"
  ;;
attention)
  # The shapes the prefill issues record: the seed shape (f16/bf16, causal or not),
  # B=8 H=32 S=4096 D=128 causal, GQA Hq=32 Hkv=8 D=128 S=4096 causal, and the Hopper
  # prefill issue's table. Ours is the launcher's choice (on Hopper wgmma, with the TMA
  # producer at head_dim 128); the cp.async wgmma kernel and the mma.sync one run the same
  # shapes in the same call as peers (RADIX_SPARSE_PREFILL_KERNEL=wgmma, =mma).
  # A paged shape (--page-size) is paired with the peers' contiguous K/V. Ours and cuDNN
  # run ATTN_REPEATS times (default 3) in turn and each keeps its median: cuDNN's figure
  # moves 5-10% between runs of one call, ours up to 5% (bench/NOTES.md).
  reps=${ATTN_REPEATS:-3}
  while read -r args; do
    rm -f "$out"/a_*.jsonl
    peer_args=$(echo "$args" | sed 's/--page-size [0-9]*//')
    page=$(echo "$args" | sed -n 's/.*--page-size \([0-9]*\).*/ page=\1/p')
    for r in $(seq 1 "$reps"); do
      "$rs" bench attention $args --json "$out/a_ours_$r.jsonl"
      python3 "$here/bench/torch_sdpa.py" --backend cudnn $peer_args --json "$out/a_cudnn_$r.jsonl"
    done
    median_row "$out/a_ours.jsonl" ours "$out"/a_ours_[0-9]*.jsonl
    median_row "$out/a_cudnn.jsonl" value "$out"/a_cudnn_[0-9]*.jsonl
    RADIX_SPARSE_PREFILL_KERNEL=mma "$rs" bench attention $args --json "$out/a_mma_ours.jsonl"
    same_run_peer "$out/a_mma_ours.jsonl" "$out/a_mma.jsonl" "radix-sparse mma.sync prefill kernel, same call"
    RADIX_SPARSE_PREFILL_KERNEL=wgmma "$rs" bench attention $args --json "$out/a_wgmma_ours.jsonl"
    same_run_peer "$out/a_wgmma_ours.jsonl" "$out/a_wgmma.jsonl" \
      "radix-sparse wgmma prefill kernel with cp.async copies (no TMA), same call"
    # The persistent TMA kernel (opt-in), and with paged K/V the TMA producer's serial
    # issue (lane 0 after the page lookup; RADIX_SPARSE_TMA_PAGED_ISSUE=serial).
    RADIX_SPARSE_PREFILL_KERNEL=tma-persistent "$rs" bench attention $args --json "$out/a_persist_ours.jsonl"
    same_run_peer "$out/a_persist_ours.jsonl" "$out/a_persist.jsonl" \
      "radix-sparse persistent TMA prefill kernel (RADIX_SPARSE_PREFILL_KERNEL=tma-persistent), same call"
    extra="--peer $out/a_persist.jsonl"
    case "$args" in *--page-size*)
      RADIX_SPARSE_TMA_PAGED_ISSUE=serial "$rs" bench attention $args --json "$out/a_serial_ours.jsonl"
      same_run_peer "$out/a_serial_ours.jsonl" "$out/a_serial.jsonl" \
        "radix-sparse TMA prefill kernel, paged boxes issued by lane 0 after the lookup (RADIX_SPARSE_TMA_PAGED_ISSUE=serial), same call"
      extra="$extra --peer $out/a_serial.jsonl" ;;
    esac
    python3 "$here/bench/torch_sdpa.py" --backend flash $peer_args --json "$out/a_flash.jsonl"
    for backend in flash cudnn; do
      # The paged shape's label names its page size; the peers' contiguous rows take it.
      python3 -c 'import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]
open(sys.argv[1],"w").writelines(json.dumps({**r,"shape":r["shape"]+sys.argv[2]})+"\n" for r in rows)' "$out/a_$backend.jsonl" "$page"
    done
    record --ours "$out/a_ours.jsonl" --peer "$out/a_mma.jsonl" --peer "$out/a_wgmma.jsonl" \
      --peer "$out/a_flash.jsonl" --peer "$out/a_cudnn.jsonl" $extra \
      --command "radix-sparse bench attention $args (median of $reps, in turn with cuDNN's; and with RADIX_SPARSE_PREFILL_KERNEL=mma, =wgmma, =tma-persistent); bench/peers/torch_sdpa.py --backend flash|cudnn $peer_args (cuDNN: median of $reps)"
  done <<'SHAPES'
--batch 16 --heads 16 --seq-len 2048 --head-dim 64 --dtype f16
--batch 16 --heads 16 --seq-len 2048 --head-dim 64 --dtype f16 --causal
--batch 16 --heads 16 --seq-len 2048 --head-dim 64 --dtype bf16
--batch 16 --heads 16 --seq-len 2048 --head-dim 64 --dtype bf16 --causal
--batch 8 --heads 32 --seq-len 4096 --head-dim 128 --dtype bf16 --causal
--batch 8 --heads 32 --kv-heads 8 --seq-len 4096 --head-dim 128 --dtype bf16 --causal
--batch 3 --heads 40 --kv-heads 8 --seq-len 3000 --head-dim 128 --dtype bf16 --causal
--batch 1 --heads 32 --kv-heads 8 --seq-len 16384 --head-dim 128 --dtype bf16 --causal
--batch 64 --heads 32 --kv-heads 8 --seq-len 500 --head-dim 128 --dtype bf16 --causal
--batch 4 --heads 28 --kv-heads 4 --seq-len 2500 --head-dim 128 --dtype bf16 --causal --page-size 16
--batch 4 --heads 28 --kv-heads 4 --seq-len 2500 --head-dim 128 --dtype bf16 --causal --page-size 32
--batch 4 --heads 28 --kv-heads 4 --seq-len 2500 --head-dim 128 --dtype bf16 --causal
--batch 2 --heads 32 --kv-heads 8 --seq-len 8192 --head-dim 128 --dtype bf16 --causal
--batch 8 --heads 32 --kv-heads 8 --seq-len 4096 --head-dim 128 --dtype bf16
SHAPES
  rm -f "$out"/a_*.jsonl
  ;;
decode)
  rm -f "$out/d_ours.jsonl"
  "$rs" bench decode --json "$out/d_ours.jsonl"
  record --ours "$out/d_ours.jsonl" --command "radix-sparse bench decode" \
    --note "bandwidth = (K+V bytes read + Q,O bytes) / median time; ratio = fraction of the copy bandwidth"
  ;;
offline)
  # Published peers (not measured here): SGLang and vLLM serving Llama-3.1-8B on one H100
  # over 1,000 ShareGPT prompts (SGLang's v0.2 benchmark post).
  for ds in synthetic-sharegpt random:1024:1024; do
    rm -f "$out/o_ours.jsonl" "$out/o_sglang.jsonl" "$out/o_vllm.jsonl"
    "$rs" bench offline --model synthetic:llama3-8b --dataset "$ds" --num-prompts "${OFFLINE_PROMPTS:-1000}" --device cuda --json "$out/o_ours.jsonl"
    python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for line in open(f"{out}/o_ours.jsonl"):
    r = json.loads(line)
    for name, value in (("o_sglang", 16215), ("o_vllm", 12553)):
        peer = {"benchmark": r["benchmark"], "shape": r["shape"], "value": value, "unit": r["unit"],
                "peer": f"{name[2:]} (published: Llama-3.1-8B, 1,000 ShareGPT prompts, one H100; not measured here)"}
        open(f"{out}/{name}.jsonl", "a").write(json.dumps(peer) + "\n")
PY
    record --ours "$out/o_ours.jsonl" --peer "$out/o_sglang.jsonl" --peer "$out/o_vllm.jsonl" \
      --command "radix-sparse bench offline --model synthetic:llama3-8b --dataset $ds --device cuda" \
      --note "peer figures are published numbers for a real Llama-3.1-8B on ShareGPT, not measured in this run"
  done
  ;;
sparse)
  # Sparse paging (the sparse-paging issue): decode attention with selection beside dense
  # at 32K contexts, then end to end on 32K-token prompts, sparse 0.3 beside dense.
  rm -f "$out/sp_ours.jsonl"
  # --back-to-back: also in CUDA graphs (the figures #24 asks for: extra.graph_speedup).
  "$rs" bench decode --sparse-budget 0.1,0.3,2048,4096 --back-to-back --case 1@32768 --case 1@131072 \
    --case 32@32768 --json "$out/sp_ours.jsonl"
  record --ours "$out/sp_ours.jsonl" --command "radix-sparse bench decode --sparse-budget 0.1,0.3,2048,4096 --back-to-back --case 1@32768 --case 1@131072 --case 32@32768" \
    --note "time includes page scoring and selection; extra.speedup = dense / sparse eager, extra.graph_speedup in CUDA graphs (same run)"
  rm -f "$out/so_dense.jsonl" "$out/so_sparse.jsonl"
  n="${SPARSE_PROMPTS:-24}"
  common="--model synthetic:llama3-8b --dataset random:32000:256 --num-prompts $n --device cuda --max-model-len 33024"
  "$rs" bench offline $common --json "$out/so_dense.jsonl"
  "$rs" bench offline $common --sparse-budget 0.3 --json "$out/so_sparse.jsonl"
  same_run_peer "$out/so_dense.jsonl" "$out/so_peer.jsonl" "radix-sparse dense (no --sparse-budget), same run"
  record --ours "$out/so_sparse.jsonl" --peer "$out/so_peer.jsonl" \
    --command "radix-sparse bench offline $common --sparse-budget 0.3 (peer: same without it)" \
    --note "sparse paging at budget 0.3 vs dense, same run; extra has the KV bytes read"
  ;;
step)
  rm -f "$out/s_ours.jsonl"
  "$rs" bench step --batch 256 --context 512 --json "$out/s_ours.jsonl"
  record --ours "$out/s_ours.jsonl" --command "radix-sparse bench step --batch 256 --context 512" \
    --note "no peer: the step's floor (weights + KV bytes over the copy bandwidth of this run) is in extra.floor_ms"
  ;;
structured)
  # Structured output's cost (the structured-output issue): every request asking for a
  # JSON object, beside an unconstrained run of the same work in the same call. Grammars
  # end requests early, so the constrained run writes the tokens each request generated
  # and the unconstrained peer runs exactly those lengths.
  rm -f "$out/js_plain.jsonl" "$out/js_ours.jsonl" "$out/js_peer.jsonl"
  common="--model synthetic:llama3-8b --num-prompts ${OFFLINE_PROMPTS:-1000} --device cuda"
  "$rs" bench offline $common --dataset synthetic-sharegpt --json-object --lengths-out "$out/js_lengths.json" --json "$out/js_ours.jsonl"
  "$rs" bench offline $common --dataset "lengths:$out/js_lengths.json" --json "$out/js_plain.jsonl"
  same_run_peer "$out/js_plain.jsonl" "$out/js_peer.jsonl" "radix-sparse unconstrained over the same lengths, same run" "$out/js_ours.jsonl"
  record --ours "$out/js_ours.jsonl" --peer "$out/js_peer.jsonl" \
    --command "radix-sparse bench offline $common --dataset synthetic-sharegpt --json-object --lengths-out L (peer: --dataset lengths:L)" \
    --note "every request constrained to a JSON object vs none over the same lengths; done when ratio >= 0.9"
  ;;
prefix)
  # The prefix cache on SGLang's generated-shared-prefix workload, with and without it.
  rm -f "$out/px_ours.jsonl" "$out/px_off.jsonl" "$out/px_peer.jsonl"
  common="--model synthetic:llama3-8b --dataset shared-prefix:64:2048:128:256 --num-prompts 1024 --device cuda"
  "$rs" bench offline $common --json "$out/px_ours.jsonl"
  "$rs" bench offline $common --no-enable-prefix-caching --json "$out/px_off.jsonl"
  same_run_peer "$out/px_off.jsonl" "$out/px_peer.jsonl" "radix-sparse without the prefix cache, same run"
  record --ours "$out/px_ours.jsonl" --peer "$out/px_peer.jsonl" \
    --command "radix-sparse bench offline $common (peer: --no-enable-prefix-caching)"
  ;;
latency)
  # Time per output token at batch 1 against its floor (weights + KV over copy, this run).
  rm -f "$out/l_ours.jsonl"
  "$rs" bench step --batch 1 --context 1024,8192,32768 --json "$out/l_ours.jsonl"
  record --ours "$out/l_ours.jsonl" --command "radix-sparse bench step --batch 1 --context 1024,8192,32768" \
    --note "no peer: the floor is in extra.floor_ms"
  ;;
fp8|fp8gemm|fp8kv|fp8e2e)
  # FP8 (the FP8 issue). `fp8` runs the three parts:
  # - fp8gemm: GEMMs beside torch._scaled_mm (row-wise scales) on the default shapes and
  #   the decode shapes (1-64 rows), whose rows also time cuBLASLt FP8, the skinny FP8
  #   GEMM (on Hopper also its wgmma variant) and, up to 8 rows, our FP8-weight GEMV back
  #   to back beyond L2;
  # - fp8kv: decode attention over e4m3 pages beside bf16 pages;
  # - fp8e2e: a batch-1 step and the offline run, FP8 weights (and KV offline) beside bf16.
  if [ $phase = fp8 ] || [ $phase = fp8gemm ]; then
  rm -f "$out/f_ours.jsonl" "$out/f_peer.jsonl"
  decode_shapes=""
  for m in 1 2 4 8 16 32 64; do for nk in 6144x4096 4096x4096 28672x4096 4096x14336; do
    decode_shapes="$decode_shapes --shape ${m}x$nk"
  done; done
  "$rs" bench gemm --dtype fp8 --json "$out/f_ours.jsonl"
  "$rs" bench gemm --dtype fp8 $decode_shapes --json "$out/f_ours.jsonl"
  python3 "$here/bench/torch_gemm.py" --dtype fp8 --json "$out/f_peer.jsonl"
  python3 "$here/bench/torch_gemm.py" --dtype fp8 $decode_shapes --json "$out/f_peer.jsonl"
  record --ours "$out/f_ours.jsonl" --peer "$out/f_peer.jsonl" \
    --command "radix-sparse bench gemm --dtype fp8 [decode shapes]; bench/peers/torch_gemm.py --dtype fp8"
  fi
  if [ $phase = fp8 ] || [ $phase = fp8kv ]; then
  rm -f "$out/fk_16.jsonl" "$out/fk_8.jsonl" "$out/fk_16_peer.jsonl"
  "$rs" bench decode --back-to-back --json "$out/fk_16.jsonl"
  "$rs" bench decode --back-to-back --kv-fp8 --json "$out/fk_8.jsonl"
  same_run_peer "$out/fk_16.jsonl" "$out/fk_16_peer.jsonl" "radix-sparse bf16 pages, same call" "$out/fk_8.jsonl"
  record --ours "$out/fk_8.jsonl" --peer "$out/fk_16_peer.jsonl" \
    --command "radix-sparse bench decode --back-to-back --kv-fp8 (peer: without --kv-fp8)" \
    --note "GB/s of the bytes each reads (FP8 pages are half); ratio > 1: the FP8 run reads faster"
  fi
  if [ $phase = fp8 ] || [ $phase = fp8e2e ]; then
  for what in step offline; do
    if [ $what = step ]; then args="bench step --batch 1 --context 1024,8192"; extra=""
    else
      args="bench offline --model synthetic:llama3-8b --dataset lengths:bench/datasets/sharegpt-1000.json --num-prompts ${OFFLINE_PROMPTS:-1000} --device cuda --roofline-copy-gbps 4230 --roofline-tflops 790"
      extra="--kv-cache-dtype fp8_e4m3"
    fi
    rm -f "$out/f_16.jsonl" "$out/f_8.jsonl" "$out/f_16_peer.jsonl"
    "$rs" $args --json "$out/f_16.jsonl"
    "$rs" $args --quantization fp8 $extra --json "$out/f_8.jsonl"
    same_run_peer "$out/f_16.jsonl" "$out/f_16_peer.jsonl" "radix-sparse bf16 weights and KV, same call" "$out/f_8.jsonl"
    record --ours "$out/f_8.jsonl" --peer "$out/f_16_peer.jsonl" \
      --command "radix-sparse $args --quantization fp8 $extra (peer: without them)"
  done
  fi
  ;;
gemv)
  # Decode GEMVs (gemv.cu, and on Hopper the streaming stream.cu) beside cuBLASLt, back to
  # back over weight copies exceeding L2; the cuBLASLt figure of each row is its peer.
  rm -f "$out/gv_ours.jsonl" "$out/gv_peer.jsonl"
  "$rs" bench gemm --gemv --runs 20 --json "$out/gv_ours.jsonl"
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
with open(f"{out}/gv_peer.jsonl", "w") as f:
    for line in open(f"{out}/gv_ours.jsonl"):
        r = json.loads(line)
        f.write(json.dumps({"benchmark": r["benchmark"], "shape": r["shape"], "value": r["extra"]["cublaslt_gbps"],
                            "unit": r["unit"], "peer": "cuBLASLt (our Gemm wrapper, heuristic algorithm), same run, back to back"}) + "\n")
PY
  record --ours "$out/gv_ours.jsonl" --peer "$out/gv_peer.jsonl" --command "radix-sparse bench gemm --gemv --runs 20" \
    --note "weight-read GB/s, back to back over weight copies exceeding L2; extra.copy_gbps = the run's copy"
  ;;
pdl)
  # Programmatic dependent launch (crates/gpu/src/jit/pdl.rs) on, the default, beside
  # RADIX_SPARSE_PDL=0 in the same call: the batch-1 step and back-to-back decode attention;
  # then the streaming GEMV (RADIX_SPARSE_GEMV=stream) beside cuBLASLt in the batch-1 step.
  for what in step decode; do
    if [ $what = step ]; then args="bench step --batch 1 --context 1024,8192"
    else args="bench decode --back-to-back --case 1@1024 --case 1@8192 --case 1@32768 --case 64@4096"; fi
    rm -f "$out/pd_on.jsonl" "$out/pd_off.jsonl" "$out/pd_peer.jsonl"
    "$rs" $args --json "$out/pd_on.jsonl"
    RADIX_SPARSE_PDL=0 "$rs" $args --json "$out/pd_off.jsonl"
    same_run_peer "$out/pd_off.jsonl" "$out/pd_peer.jsonl" "radix-sparse without programmatic dependent launch (RADIX_SPARSE_PDL=0), same call"
    record --ours "$out/pd_on.jsonl" --peer "$out/pd_peer.jsonl" --command "radix-sparse $args (peer: RADIX_SPARSE_PDL=0)"
  done
  args="bench step --batch 1 --context 1024,8192"
  rm -f "$out/pd_on.jsonl" "$out/pd_peer.jsonl" "$out/pd_lt.jsonl"
  RADIX_SPARSE_GEMV=stream "$rs" $args --json "$out/pd_on.jsonl"
  "$rs" $args --json "$out/pd_lt.jsonl"
  same_run_peer "$out/pd_lt.jsonl" "$out/pd_peer.jsonl" "radix-sparse with cuBLASLt for every product, same call"
  record --ours "$out/pd_on.jsonl" --peer "$out/pd_peer.jsonl" --command "RADIX_SPARSE_GEMV=stream radix-sparse $args (peer: unset)"
  ;;
allreduce)
  # The tensor-parallel all-reduce (the multi-GPU issue) on every visible GPU, beside
  # torch.distributed: NCCL from torch's wheel, NVLink SHARP off (KINDS.md).
  export NCCL_NVLS_ENABLE=0
  nccl_lib=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib'))")
  export RADIX_SPARSE_CUDA_LIB_DIRS="${RADIX_SPARSE_CUDA_LIB_DIRS:-$nccl_lib}"
  gpus=$(nvidia-smi -L | wc -l)
  rm -f "$out/ar_ours.jsonl" "$out/ar_peer.jsonl"
  "$rs" bench allreduce --gpus "$gpus" --json "$out/ar_ours.jsonl"
  python3 "$here/bench/torch_allreduce.py" --gpus "$gpus" --json "$out/ar_peer.jsonl"
  record --ours "$out/ar_ours.jsonl" --peer "$out/ar_peer.jsonl" \
    --command "radix-sparse bench allreduce --gpus $gpus; bench/peers/torch_allreduce.py --gpus $gpus (NCCL_NVLS_ENABLE=0)"
  ;;
prefill)
  # The Hopper prefill issue's end-to-end check: the prompt-step time of random:4000:100
  # with the launcher's prefill kernel (wgmma on Hopper) beside the mma.sync one, same call.
  common="--model synthetic:llama3-8b --dataset random:4000:100 --num-prompts 64 --device cuda"
  rm -f "$out"/pf_*.jsonl
  "$rs" bench offline $common --json "$out/pf_ours.jsonl"
  RADIX_SPARSE_PREFILL_KERNEL=mma "$rs" bench offline $common --json "$out/pf_mma.jsonl"
  python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for run in ("ours", "mma"):
    r = json.loads(open(f"{out}/pf_{run}.jsonl").readline())
    row = {"benchmark": "offline_prompt_steps", "shape": r["shape"], "ours": r["extra"]["prefill_s"],
           "unit": "s", "device": r.get("device"),
           "extra": {"prefill_steps": r["extra"]["prefill_steps"], "output_tok_s": r["ours"]}}
    open(f"{out}/pf_steps_{run}.jsonl", "w").write(json.dumps(row) + "\n")
PY
  peer="radix-sparse mma.sync prefill kernel (RADIX_SPARSE_PREFILL_KERNEL=mma), same call"
  same_run_peer "$out/pf_steps_mma.jsonl" "$out/pf_steps_peer.jsonl" "$peer"
  same_run_peer "$out/pf_mma.jsonl" "$out/pf_peer.jsonl" "$peer"
  for what in steps_ours:steps_peer ours:peer; do
    record --ours "$out/pf_${what%%:*}.jsonl" --peer "$out/pf_${what##*:}.jsonl" \
      --command "radix-sparse bench offline $common (peer: RADIX_SPARSE_PREFILL_KERNEL=mma)"
  done
  ;;
sweep)
  # Tile shapes for the prefill kernel, to choose defaults.
  for args in "--batch 16 --heads 16 --seq-len 2048 --head-dim 64 --dtype f16" \
              "--batch 8 --heads 32 --seq-len 4096 --head-dim 128 --dtype bf16 --causal"; do
    "$rs" bench attention $args --tiles 4,1,64 --tiles 4,2,64 --tiles 8,1,64 --tiles 8,2,64 --tiles 4,1,128 --tiles 4,2,32 --runs 10
  done
  ;;
esac
done
[ -f "$results" ] && cat "$results"
