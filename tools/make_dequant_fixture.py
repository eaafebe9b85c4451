#!/usr/bin/env python3
"""Blocks of every quantized GGUF type we load, dequantized by the `gguf` Python package
(llama.cpp's own gguf-py), as a second reference for crates/model/src/gguf/dequant.rs:
writes crates/model/tests/fixtures/gguf-blocks.json (committed; CI has no gguf-py).

Each type gets 3 blocks of random bytes whose f16 scale fields are set to finite values
(|d| in [1e-3, 1)), so every field is exercised: {type: {"hex": bytes, "values": f32s}}.

  pip install --target /tmp/hfenv gguf==0.19.0 numpy
  PYTHONPATH=/tmp/hfenv python3 tools/make_dequant_fixture.py
"""
import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = Path(__file__).resolve().parent.parent / "crates/model/tests/fixtures/gguf-blocks.json"
BLOCKS = 3
# Byte offsets of the f16 scale fields in each block.
SCALES = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def main():
    rng = np.random.default_rng(19)
    out = {"generated_with": {"gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
                              "numpy": np.__version__}}
    for name, offsets in SCALES.items():
        qtype = T[name]
        _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(BLOCKS, block_bytes), dtype=np.uint8)
        for b in range(BLOCKS):
            for off in offsets:
                d = np.float16(rng.uniform(1e-3, 1.0) * rng.choice([-1.0, 1.0]))
                raw[b, off:off + 2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
        values = quants.dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
        out[name] = {"hex": raw.tobytes().hex(), "values": [float(v) for v in values]}
        print(f"{name}: {BLOCKS} blocks of {block_bytes} bytes, {values.size} values")
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
