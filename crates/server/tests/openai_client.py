"""The official `openai` Python client against a running radix-sparse server.

Usage: python3 openai_client.py http://127.0.0.1:PORT [API_KEY]

Models (list and retrieve), completions and chat, streaming and not, structured output
and tool calls: checks the content,
finish reasons, usage, the streamed chunks' shape, log-probability bytes and errors. Exits
non-zero (with a message) on the first failure.
"""

import json
import re
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
    structured_output_and_tools(client, model)

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


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tag": {"enum": ["a", "b", "c"]}},
    "required": ["name", "age", "tag"], "additionalProperties": False}


def is_person(text):
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and set(v) == {"name", "age", "tag"}
            and isinstance(v["name"], str) and len(v["name"]) <= 6
            and isinstance(v["age"], int) and 0 <= v["age"] <= 150 and v["tag"] in "abc")


def chat_text(client, model, stream, **kw):
    """The content and finish reason of one chat answer, streamed or not."""
    kw = {"model": model, "messages": [{"role": "user", "content": "answer"}],
          "max_tokens": 200, "temperature": 1.0, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for c in client.chat.completions.create(**kw, stream=True):
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


def structured_output_and_tools(client, model):
    """response_format, vLLM's structured_outputs (extra_body), tools: each streamed and
    not, at temperature 1 with a random model that only the grammar keeps in line."""
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    cases = [
        (dict(response_format=rf), is_person),
        (dict(response_format={"type": "json_object"}, max_tokens=2000),
         lambda t: isinstance(json.loads(t), dict)),
        (dict(extra_body={"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}),
         lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t) is not None),
        (dict(extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}}),
         lambda t: t in ("red", "green", "blue")),
        (dict(extra_body={"structured_outputs": {"grammar": 'start: "(" /[0-9]{1,3}/ ")"'}}),
         lambda t: re.fullmatch(r"\([0-9]{1,3}\)", t) is not None),
        (dict(extra_body={"guided_json": PERSON}), is_person),
    ]
    for kw, ok in cases:
        for stream in (False, True):
            for seed in (1, 2):
                text, finish = chat_text(client, model, stream, seed=seed, **kw)
                if "max_tokens" in kw and finish == "length":
                    continue  # an unbounded object cut by max_tokens
                check(finish == "stop" and ok(text), f"{kw} stream={stream}: {finish} {text!r}")
    # Completions take them too.
    r = client.completions.create(model=model, prompt="x", max_tokens=50, temperature=1.0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    check(r.choices[0].text in ("yes", "no"), f"completion choice {r.choices[0].text!r}")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "nonsense"}}})
        check(False, "a bad schema must fail")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "response_format" in str(e), f"error {e}")

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                       "required": ["city"]}}}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kw = dict(model=model, messages=[{"role": "user", "content": "weather in Oslo?"}],
                  tools=tools, tool_choice=choice, parallel_tool_calls=False, temperature=1.0,
                  seed=4, max_tokens=100)
        r = client.chat.completions.create(**kw)
        calls = r.choices[0].message.tool_calls
        check(r.choices[0].finish_reason == "tool_calls" and calls, f"tool call {r.choices[0]}")
        call = calls[0]
        check(call.type == "function" and call.function.name == "get_weather", f"call {call}")
        check(json.loads(call.function.arguments)["city"] in ("Paris", "Oslo"), f"args {call}")
        name, args, finish, ids = "", "", None, []
        for c in client.chat.completions.create(**kw, stream=True):
            if not c.choices:
                continue
            finish = c.choices[0].finish_reason or finish
            for d in c.choices[0].delta.tool_calls or []:
                check(d.index == 0, f"index {d}")
                if d.id:
                    ids.append(d.id)
                name += d.function.name or ""
                args += d.function.arguments or ""
        check(finish == "tool_calls" and len(ids) == 1, f"stream finish {finish}, ids {ids}")
        check(name == "get_weather", f"streamed name {name!r}")
        check(json.loads(args) == json.loads(call.function.arguments), f"streamed args {args!r}")
        # The call and its result go back in the history.
        r = client.chat.completions.create(
            model=model, max_tokens=4, temperature=0, tools=tools,
            messages=[{"role": "user", "content": "weather in Oslo?"},
                      {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        check(r.choices[0].message.role == "assistant", f"after a tool result {r}")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {}}])
        check(False, "malformed tools must fail")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "tools" in str(e), f"error {e}")


if __name__ == "__main__":
    main()
