"""The official `openai` Python client against radix-sparse serving a real model
(SmolLM2-135M-Instruct in CI): a chat question whose answer is known.

Usage: python3 openai_real_model.py http://127.0.0.1:PORT

Asks "What is the capital of France?" greedily, unstreamed and streamed; both answers
must name Paris and agree, and the model must stop by itself (its end-of-turn token).
Exits non-zero (with a message) on the first failure.
"""

import sys

import openai


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")


def main():
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
              max_tokens=48, temperature=0)

    r = client.chat.completions.create(**kw)
    answer = r.choices[0].message.content
    print(f"{model}: {answer!r} ({r.usage.completion_tokens} tokens, {r.choices[0].finish_reason})")
    check("Paris" in answer, f"the answer names Paris: {answer!r}")
    check(r.choices[0].finish_reason == "stop", f"finish {r.choices[0].finish_reason}")

    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kw, stream=True) if c.choices)
    check(streamed == answer, f"streamed {streamed!r} != {answer!r}")
    print("ok")


if __name__ == "__main__":
    main()
