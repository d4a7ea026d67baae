"""Drives a Sluice gateway with the official `openai` Python package.

Run by tests/tests/openai_clients.rs with SLUICE_URL, SLUICE_KEY, SIM_BACKEND_URL, SIM_MODEL
and SIM_EMBED_MODEL set. Prints "ALL OK" when every check passed; any failure raises.
"""

import json
import os
import threading
import urllib.request
import uuid

import openai

base = os.environ["SLUICE_URL"]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=os.environ["SLUICE_KEY"], max_retries=0)
model = os.environ["SIM_MODEL"]
embed_model = os.environ["SIM_EMBED_MODEL"]


def open_gate(name):
    request = urllib.request.Request(
        f"{os.environ['SIM_BACKEND_URL']}/sim/gates/{name}/open", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["released"]


ids = [m.id for m in client.models.list().data]
assert model in ids and embed_model in ids, ids

messages = [{"role": "user", "content": "Say something about canals."}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=7)
assert chat.choices[0].message.content, chat
assert chat.usage.completion_tokens == 7, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7, chat.usage

# Streamed: the backend holds the stream after the first token until the gate opens, so the
# first token can only arrive here if the gateway passes chunks through unbuffered. A
# watchdog ends the process if it never does.
watchdog = threading.Timer(30, lambda: os._exit(3))
watchdog.start()
gate = f"python-{uuid.uuid4().hex}"
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=5,
    stream=True,
    user=f"sim-gate:{gate}",
    stream_options={"include_usage": True},
)
text = ""
released = None
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
        if released is None:
            released = open_gate(gate)
    if chunk.usage:
        usage = chunk.usage
watchdog.cancel()
assert released == 1, f"the stream was not held when its first token arrived: {released}"
assert usage is not None and usage.completion_tokens == 5, usage
assert len(text.split()) == 5, text

completion = client.completions.create(model=model, prompt="The river", max_tokens=4)
assert completion.choices[0].text, completion
assert completion.usage.completion_tokens == 4, completion.usage

# The client asks for base64 by default and decodes it itself.
embedding = client.embeddings.create(model=embed_model, input=["a quiet river"])
vector = embedding.data[0].embedding
assert len(vector) > 0
assert abs(sum(x * x for x in vector) - 1.0) < 1e-3

try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="sk-sluice-wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    assert e.body["code"] == "invalid_api_key", e.body

print("ALL OK")
