#!/usr/bin/env python3
"""Peer for `radix-sparse bench attention`: torch scaled_dot_product_attention with one
backend (FLASH_ATTENTION = FlashAttention-2, or CUDNN_ATTENTION) on the same shapes, in the
same memory layout as ours ([B, S, H, D] viewed as [B, H, S, D]), timed the same way
(CUDA events per call, warm-up, median), on random inputs.

TFLOP/s counts 4·B·H·S²·D, halved when causal. GQA uses enable_gqa=True where the
backend takes it, else K/V heads are repeated (noted in the output)."""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True, choices=["flash", "cudnn"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="f16", choices=["f16", "bf16"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    hkv = a.kv_heads or a.heads
    dtype = torch.float16 if a.dtype == "f16" else torch.bfloat16
    backend = SDPBackend.FLASH_ATTENTION if a.backend == "flash" else SDPBackend.CUDNN_ATTENTION
    name = "FlashAttention-2" if a.backend == "flash" else "cuDNN"
    torch.manual_seed(3)
    q = torch.empty(a.batch, a.seq_len, a.heads, a.head_dim, device="cuda", dtype=dtype).uniform_(-1, 1).transpose(1, 2)
    k = torch.empty(a.batch, a.seq_len, hkv, a.head_dim, device="cuda", dtype=dtype).uniform_(-1, 1).transpose(1, 2)
    v = torch.empty_like(k).uniform_(-1, 1)
    note = None

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=a.causal, enable_gqa=hkv != a.heads)

    with sdpa_kernel([backend]):
        try:
            call()
        except RuntimeError as e:
            if hkv == a.heads:
                raise
            note = f"K/V heads repeated for GQA ({str(e).splitlines()[0][:80]})"
            rep = a.heads // hkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            hkv_eff = a.heads

            def call():  # noqa: F811
                return F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
        for _ in range(a.warmup):
            call()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(a.runs):
            start.record()
            call()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    ms = statistics.median(times)
    flops = 4 * a.batch * a.heads * a.seq_len ** 2 * a.head_dim / (2 if a.causal else 1)
    tflops = flops / (ms * 1e-3) / 1e12
    shape = f"B={a.batch} Hq={a.heads} Hkv={hkv} S={a.seq_len} D={a.head_dim} {a.dtype} {'causal' if a.causal else 'full'}"
    print(f"torch {name}: {shape}: {ms:.3f} ms {tflops:.1f} TFLOP/s" + (f" [{note}]" if note else ""), flush=True)
    row = {"benchmark": "attention_prefill", "shape": shape,
           "peer": f"torch {torch.__version__} SDPA {name}", "value": tflops, "unit": "TFLOP/s",
           "median_ms": ms, "device": torch.cuda.get_device_name()}
    if note:
        row["note"] = note
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
