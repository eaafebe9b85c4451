#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the CPU: prefill and greedy decode of one
sequence of a GGUF model, the peer of `radix-sparse bench offline --device cpu` on the same
file. Writes rows for bench/record.py.

  llama_cpp_cpu.py MODEL.gguf --prompt-tokens 512 --decode-tokens 128 --threads 2 --out peer.jsonl

The prompt is random token ids in 32..127, as our `random:IN:OUT` dataset's; the
prefill is one `eval` of all of them (n_batch = prompt length), timed after a warm-up;
decode is one `eval` per token, each the argmax of the last logits."""
import argparse
import json
import random
import time

import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores (the last logits
    # go to row n_tokens - 1); the prompt still runs as one micro-batch (n_ubatch).
    n_ctx = a.prompt_tokens + a.decode_tokens + 8
    llm = Llama(model_path=a.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=a.prompt_tokens,
                n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    rng = random.Random(0)
    prompt = [rng.randrange(32, 127) for _ in range(a.prompt_tokens)]  # as random:IN:OUT
    llm.reset()
    llm.eval(prompt[:64])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.decode_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    decode_s = time.perf_counter() - t
    peer = f"llama.cpp (llama-cpp-python {__import__('llama_cpp').__version__}), {a.threads} threads, same run"
    rows = [
        {"benchmark": "cpu_prefill", "shape": a.shape, "peer": peer,
         "value": a.prompt_tokens / prefill_s},
        {"benchmark": "cpu_decode", "shape": a.shape, "peer": peer,
         "value": a.decode_tokens / decode_s},
    ]
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"llama.cpp: prefill {rows[0]['value']:.1f} tok/s, decode {rows[1]['value']:.1f} tok/s")


if __name__ == "__main__":
    main()
