"""The official `openai` Python client against a running radix-sparse server.

Usage: python3 openai_client.py http://127.0.0.1:PORT [API_KEY]

Models (list and retrieve), completions and chat, streaming and not: checks the content,
finish reasons, usage, the streamed chunks' shape, log-probability bytes and errors. Exits
non-zero (with a message) on the first failure.
"""

import sys

import openai


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")


def main():
    base = sys.argv[1].rstrip("/")
    key = sys.argv[2] if len(sys.argv) > 2 else "unused"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, f"one model listed, got {ids}")
    model = ids[0]

    # models.retrieve: the served model's card; another name is a 404.
    card = client.models.retrieve(model)
    check(card.id == model and card.object == "model", f"retrieved {card}")
    try:
        client.models.retrieve("no-such-model")
        check(False, "retrieving an unknown model must fail")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")

    # Completions, not streamed: greedy is reproducible; usage adds up.
    kw = dict(model=model, prompt="Hello, my name is", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    check(a.object == "text_completion", f"object {a.object}")
    check(len(a.choices) == 1 and a.choices[0].finish_reason == "length", f"{a.choices}")
    check(isinstance(a.choices[0].text, str), "text is a string")
    check(a.choices[0].text == b.choices[0].text, "greedy completions agree")
    u = a.usage
    check(u.completion_tokens == 8, f"completion_tokens {u.completion_tokens}")
    check(u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
          f"usage {u}")

    # n and a seed.
    c = client.completions.create(model=model, prompt="abc", max_tokens=4, n=3, seed=5,
                                  extra_body={"ignore_eos": True})
    check(sorted(ch.index for ch in c.choices) == [0, 1, 2], f"indices {c.choices}")
    check(c.usage.completion_tokens == 12, f"n=3 usage {c.usage}")

    # Completions, streamed, with usage: the same text as unstreamed.
    text, finish, usage, ids_seen = "", None, None, set()
    for chunk in client.completions.create(**kw, stream=True,
                                           stream_options={"include_usage": True}):
        ids_seen.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
            check(chunk.choices == [], "the usage chunk has no choices")
            continue
        check(finish is None, "no chunk after the finish")
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason
    check(len(ids_seen) == 1, f"one id per stream, got {ids_seen}")
    check(text == a.choices[0].text, f"streamed {text!r} != {a.choices[0].text!r}")
    check(finish == "length", f"stream finish {finish}")
    check(usage is not None and usage.completion_tokens == 8, f"stream usage {usage}")

    # Chat, not streamed.
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi."}]
    ckw = dict(model=model, messages=messages, max_tokens=6, temperature=0,
               extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**ckw)
    check(r.object == "chat.completion", f"object {r.object}")
    msg = r.choices[0].message
    check(msg.role == "assistant" and isinstance(msg.content, str), f"message {msg}")
    check(r.choices[0].finish_reason == "length", f"finish {r.choices[0].finish_reason}")
    check(r.usage.completion_tokens == 6, f"chat usage {r.usage}")

    # Chat, streamed: a role delta first, the same content, usage at the end.
    content, roles, usage = "", [], None
    for chunk in client.chat.completions.create(**ckw, stream=True,
                                                stream_options={"include_usage": True}):
        check(chunk.object == "chat.completion.chunk", f"object {chunk.object}")
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        content += delta.content or ""
    check(roles == ["assistant"], f"roles {roles}")
    check(content == msg.content, f"streamed chat {content!r} != {msg.content!r}")
    check(usage is not None and usage.completion_tokens == 6, f"chat stream usage {usage}")

    # Log-probabilities of the sampled tokens.
    r = client.chat.completions.create(**ckw, logprobs=True)
    lps = r.choices[0].logprobs.content
    check(len(lps) == 6 and all(t.logprob <= 0 for t in lps), f"logprobs {lps}")
    check(all(isinstance(t.bytes, list) for t in lps), f"logprob bytes {lps}")

    # Alternatives (chat's top_logprobs, completions' logprobs=N), streamed and not.
    r = client.chat.completions.create(**ckw, logprobs=True, top_logprobs=3)
    alts = [t.top_logprobs for t in r.choices[0].logprobs.content]
    check(all(len(a) == 3 and a[0].logprob >= a[1].logprob >= a[2].logprob for a in alts),
          f"top_logprobs {alts}")
    streamed = []
    for chunk in client.chat.completions.create(**ckw, logprobs=True, top_logprobs=3,
                                                stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += [len(t.top_logprobs) for t in chunk.choices[0].logprobs.content]
    check(streamed == [3] * 6, f"streamed top_logprobs {streamed}")
    r = client.completions.create(model=model, prompt="ab", max_tokens=4, logprobs=2,
                                  extra_body={"ignore_eos": True})
    tops = r.choices[0].logprobs.top_logprobs
    check(len(tops) == 4 and all(1 <= len(t) <= 3 for t in tops), f"completion tops {tops}")
    # logit_bias: a +100 bias makes one token certain.
    r = client.completions.create(model=model, prompt="ab", max_tokens=5, temperature=1.0,
                                  logit_bias={"90": 100}, extra_body={"ignore_eos": True})
    check(r.choices[0].text == "ZZZZZ", f"logit_bias text {r.choices[0].text!r}")
    try:
        client.completions.create(model=model, prompt="ab", max_tokens=1,
                                  logit_bias={"not-a-token": 1})
        check(False, "a bad logit_bias key must fail")
    except openai.BadRequestError as e:
        check("logit_bias" in str(e), f"error {e}")

    # Errors come back as OpenAI errors with the right status.
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        check(False, "an unknown model must fail")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=1)
        check(False, "empty messages must fail")
    except openai.BadRequestError as e:
        check("messages" in str(e), f"error {e}")

    print(f"openai {openai.__version__} against {base} ({model}): all checks passed")


if __name__ == "__main__":
    main()
