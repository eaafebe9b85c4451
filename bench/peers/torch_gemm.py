#!/usr/bin/env python3
"""Peer for `radix-sparse bench gemm`: torch.matmul on the same shapes, timed the same way
(CUDA events around each call, warm-up, median of many runs, random inputs).

Y[M,N] = X[M,K] @ W[N,K]^T, as a Linear layer and as our BLayout::NK.
--dtype fp8: torch._scaled_mm on e4m3 operands with row-wise f32 scales (one per token of
X, one per output channel of W) and bf16 output, what our FP8 linear layers run.
Prints one JSON line per shape (fields as bench/record.py reads them)."""
import argparse
import json
import statistics

import torch


def default_shapes():
    shapes = [(8192, 8192, 8192)]
    for m in (1, 64, 256, 4096):
        for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
            shapes.append((m, n, k))
    return shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", default=[], help="MxNxK")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "fp8"])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", help="append JSON lines here")
    args = ap.parse_args()
    fp8 = args.dtype == "fp8"
    dtype = torch.float16 if args.dtype == "f16" else torch.bfloat16
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shape] or default_shapes()
    torch.manual_seed(7)
    rows = []
    for m, n, k in shapes:
        x = torch.empty(m, k, device="cuda", dtype=dtype).uniform_(-1, 1)
        w = torch.empty(n, k, device="cuda", dtype=dtype).uniform_(-1, 1)
        if fp8:
            def rowwise(t):
                scale = t.abs().amax(dim=1, keepdim=True).float() / 448.0
                return (t.float() / scale).to(torch.float8_e4m3fn), scale
            xq, xs = rowwise(x)
            wq, ws = rowwise(w)
            ws = ws.t().contiguous()  # [1, N]

            def run():
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
        else:
            def run():
                return torch.matmul(x, w.t())
        for _ in range(args.warmup):
            run()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(args.runs):
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        ms = statistics.median(times)
        tflops = 2 * m * n * k / (ms * 1e-3) / 1e12
        print(f"torch {m}x{n}x{k}: {ms:.4f} ms {tflops:.1f} TFLOP/s", flush=True)
        rows.append({
            "benchmark": "gemm", "shape": f"M={m} N={n} K={k} {args.dtype}",
            "peer": f"torch {torch.__version__} " + ("_scaled_mm row-wise" if fp8 else "matmul (cuBLAS)"),
            "value": tflops,
            "unit": "TFLOP/s", "median_ms": ms, "device": torch.cuda.get_device_name(),
        })
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
