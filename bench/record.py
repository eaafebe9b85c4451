#!/usr/bin/env python3
"""Pairs our measurements with a peer's, measured in the same run on the same GPU, and
appends one line per shape to bench/results.jsonl.

  record.py --ours ours.jsonl --peer peer.jsonl --command "..." [--out results.jsonl]

Rows are matched on (benchmark, shape). `ratio` is ours/peer for throughput units
(TFLOP/s, GB/s, tok/s) and peer/ours for time units (ms, us): above 1 means we are faster.
Shapes that only one side measured are still recorded, with the missing side null."""
import argparse
import datetime
import json

TIME_UNITS = {"ms", "us", "s"}


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path):
    return {(r["benchmark"], r["shape"]): r for r in read_rows(path)} if path else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--peer", action="append", default=[])
    ap.add_argument("--command", required=True)
    ap.add_argument("--out", default="bench/results.jsonl")
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    ours = read_rows(args.ours)
    peers = [load(p) for p in args.peer] or [{}]
    date = datetime.date.today().isoformat()
    with open(args.out, "a") as f:
        for o in ours:
            key = (o["benchmark"], o["shape"])
            for peer_rows in peers:
                p = peer_rows.get(key)
                copy = (o.get("extra") or {}).get("copy_gbps")
                if p is None and copy and o["unit"] == "GB/s":
                    # Bandwidth benchmarks carry their peer, a device copy timed in the same run.
                    p = {"peer": "device-to-device copy of 1 GiB (cuMemcpyDtoD), same run", "value": copy}
                dense = (o.get("extra") or {}).get("dense_us")
                if p is None and dense and o["unit"] == "us":
                    # Sparse decode carries its peer: our dense decode kernel, same run.
                    p = {"peer": "radix-sparse dense decode attention, same run", "value": dense}
                ratio = None
                if p and o["ours"] and p["value"]:
                    ratio = (p["value"] / o["ours"]) if o["unit"] in TIME_UNITS else (o["ours"] / p["value"])
                line = {
                    "date": date,
                    "device": o.get("device"),
                    "benchmark": key[0],
                    "shape": key[1],
                    "ours": round(o["ours"], 4),
                    "peer": p["peer"] if p else None,
                    "peer_value": round(p["value"], 4) if p else None,
                    "unit": o["unit"],
                    "ratio": round(ratio, 4) if ratio is not None else None,
                    "command": args.command,
                }
                if o.get("extra"):
                    line["extra"] = o["extra"]
                if args.note:
                    line["note"] = args.note
                f.write(json.dumps(line) + "\n")
                print(json.dumps(line))


if __name__ == "__main__":
    main()
