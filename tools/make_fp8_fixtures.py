#!/usr/bin/env python3
"""Builds the FP8 checkpoint fixtures from tiny-llama-hd64 (tools/make_fixtures.py).

What it writes (under crates/model/tests/fixtures/, committed, since CI has no torch):

  tiny-llama-hd64-fp8/     quantization_config {quant_method: "fp8", activation_scheme:
                           "static"}: the seven linear projections of each layer as
                           float8_e4m3fn with one f32 `weight_scale` per tensor (shape [])
                           and a static `input_scale`, as vLLM's / llm-compressor's FP8
                           checkpoints of Llama 3 are laid out.
  tiny-llama-hd64-fp8-ct/  compressed-tensors ("float-quantized"): the same projections
                           with per-channel `weight_scale` ([rows, 1], f32) and dynamic
                           per-token activation scales (no input_scale).

Everything else (embeddings, norms; the LM head is tied) stays bf16 as in the source
fixture, and the tokenizer files are the same. Scales are amax / 448 of the tensor or
of the row; bytes are torch's round-to-nearest-even e4m3 of w / scale.

expected.json has the layout of the other fixtures. Its logits and greedy tokens are
transformers' float32 LlamaForCausalLM with every quantized weight replaced by what it
dequantizes to (e4m3 * scale) and unquantized activations: what our CPU backend
computes, and what an FP8 engine approximates (FP8 GEMMs also round the activations).
"fp8_reference" holds, where transformers loads the FP8 folder itself, its own logits
(same rows as "logits") and their largest difference from those: the -ct folder loads
with the compressed-tensors package, which also rounds each token's activations to e4m3
(the dynamic per-token scheme), as an FP8 GEMM does. transformers refuses the "fp8"
folder (static activation scales without weight_block_size are vLLM's format); why is
recorded.

Rerun (deterministic):

  pip install --target /tmp/hfenv torch==2.15.0 transformers==4.57.6 \
      tokenizers==0.22.2 safetensors==0.8.0 numpy
  pip install --target /tmp/ctenv compressed-tensors==0.20.1 loguru pydantic  # optional
  PYTHONPATH=/tmp/ctenv:/tmp/hfenv python3 tools/make_fp8_fixtures.py
"""
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (the fixtures' helpers and their versions)

SOURCE = mf.FIXTURES / "tiny-llama-hd64"
E4M3_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json")


def is_linear(name):
    return name.startswith("model.layers.") and any(
        name.endswith(f"{p}.weight") for p in PROJECTIONS)


def quantize(w, per_channel):
    """e4m3 bytes and f32 scales ([] per tensor, [rows, 1] per channel) of a matrix."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float32)


def dequantized_model(tensors):
    """The source model in float32 with `tensors` (name -> float32) replacing its own."""
    model = AutoModelForCausalLM.from_pretrained(
        SOURCE, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in tensors.items():
            params[name].copy_(t)
    return model


def expected_for(model, source_expected, label):
    prompts = [c["prompt"] for c in source_expected["cases"]]
    cases, logits_all = [], []
    for c in source_expected["cases"]:
        ids = c["ids"]
        logits = mf.forward_logits(model, ids)
        logits_all.append(logits)
        g, m = mf.greedy(model, ids)
        first = c["logits_first_position"]
        cases.append({
            "prompt": c["prompt"],
            "ids": ids,
            "logits_first_position": first,
            "logits": [[mf.sig(x) for x in row.tolist()] for row in logits[first:]],
            "greedy": g,
            "greedy_margins": [mf.sig(x) for x in m],
        })
    worst = min(min(c["greedy_margins"]) for c in cases)
    print(f"{label}: {len(prompts)} prompts, smallest greedy margin {worst:.3g}")
    expected = copy.deepcopy(source_expected)
    expected["model"] = label
    expected["cases"] = cases
    expected["notes"] = (
        "logits and greedy of transformers (float32, eager) with every FP8 weight replaced by "
        "its dequantized value (e4m3 * scale) and unquantized activations; "
        + source_expected["notes"])
    return expected, logits_all, worst


def transformers_own(folder, want):
    """Largest |logit difference| of transformers loading `folder` itself, or why not."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 (any refusal is recorded, not fatal)
        return {"loaded": False, "why": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    src = json.loads((folder / "expected.json").read_text())
    cases, diff = [], 0.0
    for c, w in zip(src["cases"], want):
        got = mf.forward_logits(model, c["ids"])
        diff = max(diff, float((got - w).abs().max()))
        first = c["logits_first_position"]
        cases.append({"logits": [[mf.sig(x) for x in row.tolist()] for row in got[first:]]})
    return {"loaded": True, "max_abs_logit_diff": mf.sig(diff), "cases": cases}


def make(folder, per_channel, config_entry):
    source_expected = json.loads((SOURCE / "expected.json").read_text())
    weights = load_file(SOURCE / "model.safetensors")
    out, deq = {}, {}
    for name, t in sorted(weights.items()):
        if not is_linear(name):
            out[name] = t
            continue
        q, scale = quantize(t, per_channel)
        out[name] = q
        out[f"{name}_scale"] = scale
        if not per_channel:
            # Static activation scale, as calibrated checkpoints carry (read past: our
            # activations are quantized per token, never coarser).
            out[name.replace(".weight", ".input_scale")] = torch.tensor(1.0 / E4M3_MAX)
        deq[name] = q.float() * scale
    expected, logits, worst = expected_for(dequantized_model(deq), source_expected, folder.name)
    if worst < mf.MIN_MARGIN:
        sys.exit(f"{folder.name}: a greedy margin {worst} < {mf.MIN_MARGIN}: exact tokens "
                 "would not be a stable test")

    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    for f in COPIED:
        shutil.copy(SOURCE / f, folder / f)
    config = json.loads((SOURCE / "config.json").read_text())
    config["quantization_config"] = config_entry
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    mf.dump_expected(expected, folder / "expected.json")
    expected["fp8_reference"] = transformers_own(folder, logits)
    own = {k: v for k, v in expected["fp8_reference"].items() if k != "cases"}
    print(f"{folder.name}: transformers on the FP8 folder itself: {own}")
    mf.dump_expected(expected, folder / "expected.json")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    make(mf.FIXTURES / "tiny-llama-hd64-fp8", False,
         {"quant_method": "fp8", "activation_scheme": "static"})
    make(mf.FIXTURES / "tiny-llama-hd64-fp8-ct", True, {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                        "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                  "symmetric": True, "dynamic": True},
        }},
    })


if __name__ == "__main__":
    main()
