"""Streams real model output with the official `openai` Python package, from a native
sluice-backend directly and through a Sluice gateway in front of it.

Run by tests/tests/smollm2_chat.rs with BACKEND_URL, SLUICE_URL, SLUICE_KEY and MODEL set.
Prints "ALL OK" when every check passed; any failure raises.
"""

import os

import openai

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
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
schema = {
    "type": "json_schema",
    "json_schema": {
        "name": "capital",
        "strict": True,
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
picture = [
    {"type": "text", "text": "What is in this picture?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
]
refused = [
    ("tools", dict(messages=question, tools=[weather])),
    ("tool_choice", dict(messages=question, tool_choice="required")),
    ("response_format", dict(messages=question, response_format=schema)),
    ("response_format", dict(messages=question, response_format={"type": "json_object"})),
    ("logprobs", dict(messages=question, logprobs=True, top_logprobs=2)),
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
print("ALL OK")
