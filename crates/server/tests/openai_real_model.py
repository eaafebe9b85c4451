"""The official `openai` Python client against radix-sparse serving a real model
(SmolLM2-135M-Instruct in CI): a chat question whose answer is known.

Usage: python3 openai_real_model.py http://127.0.0.1:PORT

Asks "What is the capital of France?" greedily, unstreamed and streamed; both answers
must name Paris and agree, and the model must stop by itself (its end-of-turn token).
Then structured output at temperature 1 (JSON-schema answers checked with the
`jsonschema` package where installed) and a required tool call.
Exits non-zero (with a message) on the first failure.
"""

import json
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

    # Structured output: 20 choices at temperature 1 follow their schema.
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, n=20, temperature=1.0, seed=1, max_tokens=48,
        messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": schema, "strict": True}})
    for ch in r.choices:
        check(ch.finish_reason == "stop", f"json_schema finish {ch.finish_reason}: {ch.message.content!r}")
        validate(json.loads(ch.message.content), schema)
    print(f"json_schema: {r.choices[0].message.content}")

    # A required tool call is a call to a declared function.
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"]}}}]
    r = client.chat.completions.create(
        model=model, temperature=1.0, seed=2, max_tokens=48, tools=tools, tool_choice="required",
        parallel_tool_calls=False,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    call = r.choices[0].message.tool_calls[0]
    check(r.choices[0].finish_reason == "tool_calls", f"tool finish {r.choices[0].finish_reason}")
    check(call.function.name == "get_weather", f"call {call}")
    validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])
    print(f"tool call: {call.function.name}({call.function.arguments})")
    print("ok")


def validate(value, schema):
    """jsonschema where installed; else the shape checks these schemas need."""
    try:
        import jsonschema
    except ImportError:
        check(isinstance(value, dict) and set(value) >= set(schema.get("required", [])),
              f"{value} against {schema}")
        return
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        check(False, f"{value} does not match its schema: {e.message}")


if __name__ == "__main__":
    main()
