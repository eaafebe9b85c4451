#!/usr/bin/env python3
"""Builds the Hugging Face parity fixtures for the CPU forward pass.

What it writes (everything under crates/model/tests/fixtures/, committed, since CI has
no torch):

  tiny-llama/   LlamaForCausalLM: hidden 64, intermediate 128, 2 layers, 4 heads,
                2 KV heads (GQA), head_dim 16, rope_theta 1e4 with llama3 rope scaling
                (factor 8, low 1, high 4, original_max_position_embeddings 64, so every
                band of the scaling is hit), untied lm_head, no biases.
  tiny-qwen2/   Qwen2ForCausalLM: the same sizes, q/k/v biases, tied embeddings,
                rope_theta 1e6, no rope scaling, no sliding window.
  tiny-llama-hd64/  LlamaForCausalLM with a head_dim the CUDA kernels take (64):
                hidden 128, intermediate 64, 2 layers, 2 heads, 1 KV head, tied
                embeddings, llama3 rope scaling as tiny-llama; weights rounded to
                bfloat16 and saved in bfloat16 (half the bytes; the float32 reference
                runs on exactly those values). GREEDY margins >= GPU_MIN_MARGIN, so the
                CUDA backend (bfloat16) must pick the same tokens too.

Each folder is a normal HF checkpoint:
  config.json, generation_config.json, model.safetensors (float32, one file),
  tokenizer.json, tokenizer_config.json (with a Llama-3-style chat_template),
  special_tokens_map.json, and expected.json, which holds what HF computes:
    generated_with  the exact versions used,
    cases[]         prompt, ids (add_special_tokens=True), logits of one full forward
                    pass (float32, 6 significant digits; see LOGIT_POSITIONS below
                    for which positions are stored), greedy (12 argmax steps, no EOS
                    stop, full recompute per step) and greedy_margins (top1 - top2
                    logit at each step; every one is >= MIN_MARGIN, so exact token
                    equality is a stable test),
    chat            messages, rendered (apply_chat_template(..., tokenize=False,
                    add_generation_prompt=True)) and ids (rendered text encoded with
                    add_special_tokens=False: the template already starts with BOS).

The tokenizer is a small byte-level BPE trained here on the built-in TRAINING_TEXT
(256 byte tokens + merges, then 5 special tokens appended after the BPE vocabulary,
as in Llama 3). Weights are drawn from fixed seeds with a larger spread than HF's
default init (matrices N(0, 0.1), norms 1 + N(0, 0.1), biases N(0, 0.1)) so logits are
well spread. If a seed gives a greedy step with a margin below MIN_MARGIN, the next
seed is tried; the seed used is recorded in expected.json.

The script then reloads each folder with AutoModelForCausalLM / AutoTokenizer (and
tokenizer.json with the plain `tokenizers` library, as the Rust side does) and checks
that the ids, the rendered chat and the logits reproduce exactly.

Rerun (deterministic: the same versions give byte-identical files):

  pip install --target /tmp/hfenv torch==2.15.0 transformers==4.57.6 \
      tokenizers==0.22.2 safetensors==0.8.0 numpy
  PYTHONPATH=/tmp/hfenv python3 tools/make_fixtures.py [FOLDER ...]

(PyPI's Linux torch wheel pulls its CUDA libraries as dependencies, about 5 GB in all;
they are needed only for `import torch` to load, the script runs on the CPU.)
Set FIXTURE_LOGIT_POSITIONS=all to store logits for every position of every prompt
(about 80 KB more per model, 1.1 MB in all; the committed files use the default,
"last4": every position of the shortest prompt, the last 4 positions of the others).

Versions used for the committed files are in each expected.json ("generated_with").
transformers 4.57 (the last 4.x) is used on purpose: 5.x writes rope settings as
"rope_parameters" instead of the "rope_theta"/"rope_scaling" keys that real Llama 3 and
Qwen2 checkpoints carry, and tokenizers 0.22 matches the Rust `tokenizers` crate.
"""

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "crates" / "model" / "tests" / "fixtures"

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIALS = [BOS, EOS, START_HEADER, END_HEADER, EOT]

# Size of the trained BPE vocabulary (256 byte tokens + merges); the 5 special tokens
# come after it, so the model's vocab_size is BPE_VOCAB + 5.
BPE_VOCAB = 315

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran
into the forest before the farmer could see what had happened. In the morning the
farmer walked to the river with his daughter. They talked about the weather, the
harvest and the price of bread in the town. The river was cold and clear, and the
water moved slowly over the stones. She asked him why the sky is blue, and he said
that light from the sun is scattered by the air, and that blue light is scattered
more than red light. Then they went home for breakfast: eggs, bread, butter and tea.
A language model reads text as a sequence of tokens and predicts the next one. Each
token is a small piece of a word, a whole word, a number or a mark of punctuation.
The model turns every token into a vector, mixes the vectors with attention, and
writes out a score for every token in its vocabulary. The highest score wins when
the model decodes greedily. Hello, world! How are you today? I am fine, thank you.
What is the capital of France? The capital of France is Paris. Please write a short
poem about the sea, the wind and the stars. Numbers like 1, 2, 3, 10, 42 and 2024
appear in text as well, and so do names such as Alice, Bob and Carol.
"""

# Prompts of about 3, 10 and 25 tokens (the counts below include BOS).
PROMPTS = [
    "The sea",  # 4 tokens with BOS
    "The water is cold.",  # 10
    "The fox and the dog ran to the river in the morning.",  # 25
]

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]

GREEDY_STEPS = 12
MIN_MARGIN = 1e-3
GPU_MIN_MARGIN = 0.05
SIG_DIGITS = 6
# Positions whose logits are stored: every position of every prompt unless the
# fixture would get too big, in which case "last4" keeps every position of the
# shortest prompt and the last 4 positions of the others.
LOGIT_POSITIONS = os.environ.get("FIXTURE_LOGIT_POSITIONS", "last4")

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    hidden_act="silu",
    torch_dtype="float32",
)


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for s in SPECIALS]
    )
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def hf_tokenizer(tok):
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_weights(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:  # matrices, embeddings and biases
                p.copy_(0.1 * noise)


def sig(x):
    return float(f"{x:.{SIG_DIGITS}g}")


@torch.no_grad()
def forward_logits(model, ids):
    return model(torch.tensor([ids], dtype=torch.long)).logits[0].float()


@torch.no_grad()
def greedy(model, ids):
    ids = list(ids)
    out, margins = [], []
    for _ in range(GREEDY_STEPS):
        last = forward_logits(model, ids)[-1]
        top2 = torch.topk(last, 2)
        nxt = int(torch.argmax(last))
        assert nxt == int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        out.append(nxt)
        ids.append(nxt)
    return out, margins


HD64 = dict(
    COMMON,
    hidden_size=128,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)


def build_model(kind, vocab, specials, seed):
    torch.manual_seed(seed)
    if kind in ("llama", "llama-hd64"):
        hd64 = kind == "llama-hd64"
        cfg = LlamaConfig(
            vocab_size=vocab,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=hd64,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=specials[BOS],
            eos_token_id=specials[EOS],
            **(HD64 if hd64 else COMMON),
        )
        cfg._attn_implementation = "eager"
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(
            vocab_size=vocab,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling=None,
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=specials[BOS],
            eos_token_id=specials[EOS],
            **COMMON,
        )
        cfg._attn_implementation = "eager"
        model = Qwen2ForCausalLM(cfg)
    init_weights(model, seed)
    if kind == "llama-hd64":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    model.eval()
    return model


def dump_expected(expected, path):
    """JSON with one line per logits row (indent elsewhere), so diffs stay readable."""
    rows = {}

    def placeholder(row):
        key = f"@@ROW{len(rows)}@@"
        rows[key] = json.dumps(row, separators=(",", ":"))
        return key

    doc = json.loads(json.dumps(expected))
    for case in doc["cases"]:
        case["logits"] = [placeholder(r) for r in case["logits"]]
        for k in ("ids", "greedy", "greedy_margins"):
            case[k] = placeholder(case[k])
    doc["chat"]["ids"] = placeholder(doc["chat"]["ids"])
    # FP8 fixtures (tools/make_fp8_fixtures.py): transformers' own logits, rows as above.
    for case in doc.get("fp8_reference", {}).get("cases", []):
        case["logits"] = [placeholder(r) for r in case["logits"]]
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    for key, val in rows.items():
        text = text.replace(f'"{key}"', val)
    assert json.loads(text) == json.loads(json.dumps(expected))
    path.write_text(text + "\n", encoding="utf-8")


def make(kind, folder, tok, fast, base_seed):
    vocab = tok.get_vocab_size()
    specials = {s: tok.token_to_id(s) for s in SPECIALS}
    prompt_ids = [fast(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    for p, ids in zip(PROMPTS, prompt_ids):
        assert ids == tok.encode(p, add_special_tokens=True).ids, p
        assert ids[0] == specials[BOS]

    min_margin = GPU_MIN_MARGIN if kind == "llama-hd64" else MIN_MARGIN
    for seed in range(base_seed, base_seed + 1000):
        model = build_model(kind, vocab, specials, seed)
        results = [greedy(model, ids) for ids in prompt_ids]
        worst = min(min(m) for _, m in results)
        if worst >= min_margin:
            break
        print(f"{kind}: seed {seed} has a greedy margin {worst:.2e} < {min_margin}, next seed")
    else:
        sys.exit(f"{kind}: no seed in 1000 gives greedy margins >= {min_margin}")

    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    if kind == "llama-hd64":
        # A copy: converting in place would round the RoPE inv_freq buffer too.
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder, save_jinja_files=False)
    if kind in ("llama", "llama-hd64"):
        gen = GenerationConfig(bos_token_id=specials[BOS], eos_token_id=[specials[EOS], specials[EOT]])
    else:
        gen = GenerationConfig(bos_token_id=specials[BOS], eos_token_id=specials[EOS])
    gen.save_pretrained(folder)

    shortest = min(range(len(PROMPTS)), key=lambda i: len(prompt_ids[i]))
    cases, full_logits = [], []
    for i, (p, ids, (g, m)) in enumerate(zip(PROMPTS, prompt_ids, results)):
        logits = forward_logits(model, ids)
        full_logits.append(logits)
        if LOGIT_POSITIONS == "all" or i == shortest:
            first = 0
        else:
            first = max(0, len(ids) - 4)
        case = {
            "prompt": p,
            "ids": ids,
            "logits_first_position": first,
            "logits": [[sig(x) for x in row.tolist()] for row in logits[first:]],
            "greedy": g,
            "greedy_margins": [sig(x) for x in m],
        }
        cases.append(case)

    rendered = fast.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = fast(rendered, add_special_tokens=False)["input_ids"]
    expected = {
        "generated_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "model": kind,
        "seed": seed,
        "vocab_size": vocab,
        "special_tokens": specials,
        "logit_digits": SIG_DIGITS,
        "notes": (
            "logits[k] is the row for prompt position logits_first_position + k; "
            "greedy is 12 argmax steps without an EOS stop, full recompute per step"
        ),
        "cases": cases,
        "chat": {"messages": CHAT_MESSAGES, "rendered": rendered, "ids": chat_ids},
    }
    dump_expected(expected, folder / "expected.json")
    verify(folder, expected, full_logits)


@torch.no_grad()
def verify(folder, expected, full_logits):
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    raw_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    saved = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    for case, want in zip(saved["cases"], full_logits):
        ids = hf_tok(case["prompt"], add_special_tokens=True)["input_ids"]
        assert ids == case["ids"], (ids, case["ids"])
        assert raw_tok.encode(case["prompt"], add_special_tokens=True).ids == ids
        assert raw_tok.decode(ids, skip_special_tokens=True) == case["prompt"]
        got = forward_logits(model, ids)
        assert torch.equal(got, want), f"{folder.name}: reloaded logits differ"
        first = case["logits_first_position"]
        assert case["logits"] == [[sig(x) for x in r.tolist()] for r in got[first:]]
        g, _ = greedy(model, ids)
        assert g == case["greedy"]
    # sdpa (the HF default) for information: it should agree to float32 rounding.
    sdpa = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    diff = max(
        float((forward_logits(sdpa, c["ids"]) - w).abs().max())
        for c, w in zip(saved["cases"], full_logits)
    )
    chat = saved["chat"]
    rendered = hf_tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
    assert rendered == chat["rendered"]
    assert raw_tok.encode(rendered, add_special_tokens=False).ids == chat["ids"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == raw_tok.get_vocab_size(with_added_tokens=True)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder.name}: round trip exact (seed {saved['seed']}, eager vs sdpa max |diff| "
          f"{diff:.2e}), {size} bytes")
    for f in sorted(folder.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        print(f"  {f.stat().st_size:>8}  {sha}  {f.name}")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tok = build_tokenizer()
    again = build_tokenizer()
    assert tok.to_str() == again.to_str(), "BPE training is not deterministic"
    fast = hf_tokenizer(tok)
    print(f"vocab {tok.get_vocab_size()}; specials "
          f"{ {s: tok.token_to_id(s) for s in SPECIALS} }")
    for p in PROMPTS:
        print(f"  {len(fast(p)['input_ids']):>3} tokens: {p!r}")
    only = set(sys.argv[1:])  # fixture folder names; all when none given
    for kind, folder, seed in [
        ("llama", "tiny-llama", 1000),
        ("qwen2", "tiny-qwen2", 2000),
        ("llama-hd64", "tiny-llama-hd64", 3000),
    ]:
        if not only or folder in only:
            make(kind, FIXTURES / folder, tok, fast, base_seed=seed)
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"fixtures total {total} bytes")


if __name__ == "__main__":
    main()
