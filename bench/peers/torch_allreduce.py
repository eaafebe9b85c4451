#!/usr/bin/env python3
"""Peer for `radix-sparse bench allreduce`: torch.distributed.all_reduce (NCCL backend,
one process per GPU) on the same bf16 message sizes, timed the same way: CUDA events
around back-to-back calls after warm-up, the median of the samples, the slowest rank's;
reported as NCCL's bus bandwidth (bytes / time x 2(n-1)/n).

Prints one line per size and, with --json, appends rows as bench/record.py reads them."""
import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def default_elements():
    return [4096 * t for t in (1, 8, 64, 256, 2048, 8192)] + [64 << 20, 256 << 20]


def rank_main(rank, args, sizes):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{args.port}",
                            rank=rank, world_size=args.gpus)
    n = args.gpus
    buf = torch.ones(max(sizes), dtype=torch.bfloat16, device="cuda")
    rows = []
    for size in sizes:
        x = buf[:size]
        for _ in range(args.warmup):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(args.samples):
            start.record()
            for _ in range(args.per_sample):
                dist.all_reduce(x)
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / args.per_sample)
        ms = torch.tensor([statistics.median(samples)], device="cuda")
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank's
        ms = float(ms.item())
        nbytes = 2 * size
        gbps = nbytes / (ms * 1e-3) / 1e9 * 2 * (n - 1) / n
        if rank == 0:
            print(f"torch all_reduce {size:>12} elements: {ms * 1e3:9.2f} us {gbps:8.1f} GB/s", flush=True)
            rows.append({
                "benchmark": "allreduce", "shape": f"bf16 elements={size} gpus={n}",
                "peer": f"torch {torch.__version__} distributed.all_reduce (NCCL "
                        f"{'.'.join(map(str, torch.cuda.nccl.version()))})",
                "value": gbps, "unit": "GB/s", "median_ms": ms,
                "device": torch.cuda.get_device_name(),
            })
    if rank == 0 and args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--elements", default="", help="comma-separated bf16 element counts")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--per-sample", type=int, default=10)
    ap.add_argument("--port", type=int, default=29511)
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.elements.split(",") if s] or default_elements()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(rank_main, args=(args, sizes), nprocs=args.gpus, join=True)


if __name__ == "__main__":
    main()
