"""Tool calls and structured output of `edgelm serve` through the official `openai` client,
validated with `jsonschema`. Run by tests/serve.rs:

    serve_tools.py BASE_URL API_KEY MODEL

Exits non-zero if any check fails; prints one line per check.
"""

import json
import sys

import jsonschema
import openai
from openai import OpenAI

from checks import check, main

BASE, KEY, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=300)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather",
                                      "description": "Current weather for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time",
                                      "description": "Current local time in a city",
                                      "parameters": CLOCK}},
]
PARAMS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

def ask(messages, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def valid_calls(message):
    """The message's calls, each naming an offered tool with arguments valid for it."""
    calls = message.tool_calls or []
    for c in calls:
        assert c.type == "function" and c.id, c
        assert c.function.name in PARAMS, c.function.name
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])
    assert len({c.id for c in calls}) == len(calls), "call ids repeat"
    return calls


def shape(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def round_trip(first):
    """Answer the call with a tool result and get the final answer."""
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    # `none`: the answer must be text (this 0.5B model, offered the tools again, calls again).
    final = ask(messages, tools=TOOLS, tool_choice="none", max_tokens=60)
    c = final.choices[0]
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert c.message.content and not c.message.tool_calls, c.message
    # The tool's result reached the model: its answer uses it.
    assert "18" in c.message.content, c.message.content
    return c.message.content


@check
def tool_round_trip():
    r = ask(ASK, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", (c.finish_reason, c.message)
    calls = valid_calls(c.message)
    assert shape(calls)[0][0] == "get_weather", shape(calls)
    assert shape(calls)[0][1]["city"] == "Paris", shape(calls)
    round_trip(r)


@check
def streamed_tool_calls_accumulate_to_the_non_streamed_result():
    whole = ask(ASK, tools=TOOLS).choices[0]
    with client.chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=200
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls", streamed.finish_reason
    assert shape(valid_calls(streamed.message)) == shape(whole.message.tool_calls)
    assert (streamed.message.content or None) == (whole.message.content or None)
    # Raw chunks: each index's first delta names the call, later ones carry only arguments.
    seen = set()
    for chunk in client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=200, stream=True
    ):
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.index in seen:
                assert d.id is None and d.function.name is None, d
            else:
                assert d.index == len(seen) and d.id and d.function.name and d.type == "function", d
                seen.add(d.index)
    assert seen == {0}, seen
    round_trip(final)


@check
def tool_choice_required_and_named():
    # A greeting needs no tool, but `required` makes one.
    greet = [{"role": "user", "content": "Hello there!"}]
    r = ask(greet, tools=TOOLS, tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    assert valid_calls(r.choices[0].message)
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        if stream:
            with client.chat.completions.stream(
                model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, temperature=0,
                max_tokens=200,
            ) as s:
                for _ in s:
                    pass
                msg = s.get_final_completion().choices[0].message
        else:
            msg = ask(ASK, tools=TOOLS, tool_choice=named).choices[0].message
        calls = valid_calls(msg)
        assert [c.function.name for c in calls] == ["get_time"], shape(calls)
    # `none`: tools are not offered; the answer is text.
    r = ask(ASK, tools=TOOLS, tool_choice="none", max_tokens=30)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content


@check
def two_calls_in_one_answer():
    both = [{"role": "user",
             "content": "What is the weather in Paris and what time is it in Tokyo?"}]
    r = ask(both, tools=TOOLS, tool_choice="required")
    calls = shape(valid_calls(r.choices[0].message))
    assert [n for n, _ in calls] == ["get_weather", "get_time"], calls
    assert calls[1][1]["city"] == "Tokyo", calls


@check
def tool_mistakes_are_400():
    for kw in (
        {"tools": [{"type": "function"}]},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": "sometimes"},
    ):
        try:
            ask(ASK, **kw)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body, e
            continue
        raise AssertionError(f"accepted {kw}")


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "born": {"type": "integer", "minimum": 1000, "maximum": 2100},
            "fields": {"type": "array", "items": {"enum": ["math", "science", "art", "music"]},
                       "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "born", "fields"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 30},
                               "vip": {"type": "boolean"}},
                "required": ["name", "vip"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                   "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            },
            "status": {"enum": ["new", "paid", "shipped"]},
        },
        "required": ["customer", "items", "status"],
        "additionalProperties": False,
    },
    "answer": {
        "type": "object",
        # Percent as an integer: a greedy small model can write 0.9999… until max_tokens.
        "properties": {"language": {"type": "string", "maxLength": 20},
                       "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["language", "confidence"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "person": "Describe Ada Lovelace as a person record.",
    "order": "Make an example shop order for a customer named Lin.",
    "answer": "Which programming language is best for data science, and how sure are you?",
}


@check
def json_schema_output_validates():
    for name, schema in SCHEMAS.items():
        for stream in (False, True):
            fmt = {"type": "json_schema",
                   "json_schema": {"name": name, "schema": schema, "strict": True}}
            messages = [{"role": "user", "content": PROMPTS[name]}]
            if stream:
                text = "".join(
                    c.choices[0].delta.content or ""
                    for c in client.chat.completions.create(
                        model=MODEL, messages=messages, response_format=fmt, temperature=0,
                        max_tokens=300, stream=True)
                    if c.choices
                )
            else:
                r = ask(messages, response_format=fmt, max_tokens=300)
                assert r.choices[0].finish_reason == "stop", r.choices[0]
                text = r.choices[0].message.content
            jsonschema.validate(json.loads(text), schema)
    # The client's own structured-output helper parses it too.
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS["answer"]}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": SCHEMAS["answer"],
                                         "strict": True}},
        temperature=0, max_tokens=100,
    )
    jsonschema.validate(json.loads(parsed.choices[0].message.content), SCHEMAS["answer"])


@check
def json_object_and_completions():
    r = ask([{"role": "user", "content": "List three fruits with their colours as JSON."}],
            response_format={"type": "json_object"}, max_tokens=150)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # Also on /v1/completions (llama-server's extension), through the client's extra_body.
    r = client.completions.create(
        model=MODEL, prompt="A JSON record of the planet Mars:", max_tokens=200, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": SCHEMAS["answer"]}}},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["answer"])


@check
def bad_schemas_are_400():
    for schema in (
        {"type": "integer", "minimum": 5, "maximum": 1},
        {"type": "nonsense"},
        {"$ref": "#/$defs/missing"},
    ):
        try:
            ask(ASK, response_format={"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": schema}})
        except openai.BadRequestError as e:
            assert e.status_code == 400, e
            assert e.body["param"] == "response_format", e.body
            assert "grammar" in e.body["message"] or "schema" in e.body["message"], e.body
            continue
        raise AssertionError(f"accepted {schema}")


if __name__ == "__main__":
    main()
