"""Streams real model output with the official `openai` Python package, from a native
sluice-backend directly and through a Sluice gateway in front of it.

Run by tests/tests/smollm2_chat.rs with BACKEND_URL, SLUICE_URL, SLUICE_KEY and MODEL set.
Prints "ALL OK" when every check passed; any failure raises.
"""

import json
import os
from typing import Literal

import jsonschema
import openai
import pydantic

model = os.environ["MODEL"]
question = [{"role": "user", "content": "What is the capital of France?"}]
clients = {
    # The backend asks for no key; the client insists on one.
    "backend": openai.OpenAI(
        base_url=f"{os.environ['BACKEND_URL']}/v1", api_key="unused", max_retries=0
    ),
    "gateway": openai.OpenAI(
        base_url=f"{os.environ['SLUICE_URL']}/v1", api_key=os.environ["SLUICE_KEY"], max_retries=0
    ),
}

answers = {}
for name, client in clients.items():
    stream = client.chat.completions.create(
        model=model,
        messages=question,
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    text = "".join(pieces)
    assert "Paris" in text, (name, text)
    assert len(pieces) > 1, (name, "the reply came in one piece", pieces)
    assert finish == "stop", (name, finish)
    assert usage is not None and usage.prompt_tokens > 0, (name, usage)
    assert usage.completion_tokens >= len(pieces), (name, usage, len(pieces))
    answers[name] = text

    completion = client.completions.create(
        model=model, prompt="The capital of France is", temperature=0, max_tokens=6, stream=True
    )
    text = "".join(c.choices[0].text for c in completion if c.choices)
    assert "Paris" in text, (name, text)

# Greedy decoding: the gateway passes the backend's reply through unchanged.
assert answers["backend"] == answers["gateway"], answers

# What the engine cannot honour is refused by name, never answered as if it had not been
# asked: directly and through the gateway, streamed or not.
weather = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
picture = [
    {"type": "text", "text": "What is in this picture?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
]
refused = [
    # Tools without a choice (or "auto"): the engine does not choose between a call and text.
    ("tool_choice", dict(messages=question, tools=[weather])),
    ("tool_choice", dict(messages=question, tools=[weather], tool_choice="auto")),
    ("functions", dict(messages=question, functions=[weather["function"]])),
    ("messages[0].content[1].type", dict(messages=[{"role": "user", "content": picture}])),
]
for name, client in clients.items():
    for param, asked in refused:
        for stream in (False, True):
            try:
                client.chat.completions.create(model=model, max_tokens=8, stream=stream, **asked)
            except openai.BadRequestError as err:
                body = err.body if isinstance(err.body, dict) else {}
                assert err.status_code == 400, (name, param, err)
                assert body.get("code") == "unsupported_parameter", (name, param, body)
                assert body.get("param") == param, (name, param, body)
                assert param.split("[")[0] in body.get("message", ""), (name, param, body)
            else:
                raise AssertionError(f"{name}: {param} was answered, not refused")
    # Asking for nothing of the kind is no request: answered as usual.
    plain = client.chat.completions.create(
        model=model,
        messages=question,
        temperature=0,
        max_tokens=48,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        logprobs=False,
    )
    assert plain.choices[0].message.content == answers[name], (name, plain)
    try:
        client.completions.create(model=model, prompt="The capital of France is", echo=True)
    except openai.BadRequestError as err:
        assert err.body.get("param") == "echo", (name, err.body)
    else:
        raise AssertionError(f"{name}: echo was answered, not refused")

# Structured outputs: replies bound to a JSON schema validate against it, greedy (directly)
# and sampled (through the gateway); nested objects, enums, arrays and $defs/$ref.
person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
order = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {"$ref": "#/$defs/item"},
            "minItems": 1,
            "maxItems": 3,
        },
        "status": {"enum": ["new", "paid", "shipped"]},
    },
    "required": ["customer", "items", "status"],
    "additionalProperties": False,
    "$defs": {
        "item": {
            "type": "object",
            "properties": {
                "product": {"type": "string", "maxLength": 20},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                "price": {"type": "number", "minimum": 0, "maximum": 10000},
            },
            "required": ["product", "quantity", "price"],
            "additionalProperties": False,
        }
    },
}
forecast = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]},
                    "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]},
                    "high_celsius": {"type": "integer", "minimum": -40, "maximum": 50},
                },
                "required": ["day", "sky", "high_celsius"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
cases = [
    (person, "Invent a person who edits a newspaper."),
    (person, "Describe the administrator of a small website."),
    (order, "A customer orders two books and a lamp. Write the order."),
    (order, "Record an order of three apples for Ann, who is a regular."),
    (forecast, "Give the weather for Paris for the next two days."),
    (forecast, "What will the weather be like in Oslo on Monday?"),
]
for name, client in clients.items():
    for schema, prompt in cases:
        sampled = dict(temperature=0.8, seed=7) if name == "gateway" else dict(temperature=0)
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "reply", "strict": True, "schema": schema},
            },
            max_tokens=200,
            **sampled,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (name, prompt, choice)
        jsonschema.validate(json.loads(choice.message.content), schema)

    # The client's own structured-output helper, from a pydantic model.
    class Capital(pydantic.BaseModel):
        country: str = pydantic.Field(max_length=30)
        capital: str = pydantic.Field(max_length=30)
        continent: Literal["africa", "america", "asia", "europe", "oceania"]

    parsed = client.chat.completions.parse(
        model=model, messages=question, response_format=Capital, temperature=0, max_tokens=80
    )
    assert isinstance(parsed.choices[0].message.parsed, Capital), (name, parsed)

    # Any JSON object.
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply with a JSON object giving the capital of France."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict), (name, reply)

    # A schema the engine cannot follow is the client's error, named.
    try:
        client.chat.completions.create(
            model=model,
            messages=question,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/none"}}},
        )
    except openai.BadRequestError as err:
        assert err.body.get("param") == "response_format", (name, err.body)
    else:
        raise AssertionError(f"{name}: an unresolvable schema was answered")

# Tool calls: when a call is required (or a function named), the reply is one call whose
# arguments validate against the function's parameters; streamed, the pieces add up to
# the same call.
ask_weather = [{"role": "user", "content": "What is the weather like in Paris today?"}]
named = {"type": "function", "function": {"name": "weather"}}
clock = {
    "type": "function",
    "function": {
        "name": "clock",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
for name, client in clients.items():
    for choice_param in ("required", named):
        asked = dict(
            model=model,
            messages=ask_weather,
            tools=[weather, clock] if choice_param == "required" else [clock, weather],
            tool_choice=choice_param,
            temperature=0,
            max_tokens=80,
        )
        reply = client.chat.completions.create(**asked)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", (name, choice)
        assert choice.message.content is None, (name, choice)
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id, (name, call)
        if choice_param == named:
            assert call.function.name == "weather", (name, call)
        tool = weather if call.function.name == "weather" else clock
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

        stream = client.chat.completions.create(**asked, stream=True)
        ids, names, arguments, finish = set(), [], "", None
        for chunk in stream:
            for c in chunk.choices:
                for delta in c.delta.tool_calls or []:
                    assert delta.index == 0
                    if delta.id:
                        ids.add(delta.id)
                    if delta.function and delta.function.name:
                        names.append(delta.function.name)
                    if delta.function and delta.function.arguments:
                        arguments += delta.function.arguments
                if c.finish_reason:
                    finish = c.finish_reason
        assert finish == "tool_calls" and len(ids) == 1, (name, finish, ids)
        assert names == [call.function.name], (name, names, call)
        assert json.loads(arguments) == json.loads(call.function.arguments), (name, arguments, call)

    # The call goes back into the conversation, with the tool's answer, and is read.
    follow = client.chat.completions.create(
        model=model,
        messages=ask_weather
        + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
        ],
        temperature=0,
        max_tokens=30,
    )
    assert follow.choices[0].message.content, (name, follow)

# Log probabilities: one per token, the chosen token the likeliest under greedy decoding,
# alternatives in order; streamed they are the same numbers.
for name, client in clients.items():
    whole = client.chat.completions.create(
        model=model, messages=question, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens, (name, whole)
    assert "".join(t.token for t in content) == whole.choices[0].message.content, (name, content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3, (name, t)
        assert t.top_logprobs[0].token == t.token, (name, t)
        assert t.top_logprobs[0].logprob == t.logprob, (name, t)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes) == t.token.encode(), (name, t)
    streamed = []
    for chunk in client.chat.completions.create(
        model=model, messages=question, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True
    ):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content], name

    text = client.completions.create(
        model=model, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2
    ).choices[0]
    lp = text.logprobs
    assert "".join(lp.tokens) == text.text, (name, text)
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, (name, lp)
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert len(top) <= 2 and token in top, (name, token, top)

    # A bias of 100 all but forces a token: every token of the reply is that one.
    forced = client.chat.completions.create(
        model=model, messages=question, temperature=0, max_tokens=3, logprobs=True,
        logit_bias={"28": 100},
    )
    tokens = [t.token for t in forced.choices[0].logprobs.content]
    assert len(tokens) == 3 and len(set(tokens)) == 1, (name, tokens)
    # Ids past the vocabulary, biases past ±100 and keys that are no ids are refused.
    for bad in ({"99999999": 5}, {"28": 101}, {"x": 1}):
        try:
            client.chat.completions.create(model=model, messages=question, logit_bias=bad)
        except openai.BadRequestError as err:
            assert err.body.get("param") == "logit_bias", (name, bad, err.body)
        else:
            raise AssertionError(f"{name}: logit_bias {bad} was answered")

    # top_logprobs without logprobs, and out of range, are the client's errors.
    for bad in (dict(top_logprobs=2), dict(logprobs=True, top_logprobs=21)):
        try:
            client.chat.completions.create(model=model, messages=question, **bad)
        except openai.BadRequestError as err:
            assert err.body.get("param") == "top_logprobs", (name, bad, err.body)
        else:
            raise AssertionError(f"{name}: {bad} was answered")
print("ALL OK")
