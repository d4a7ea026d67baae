"""A streamed request answered from Sluice's response cache reads, through the official
`openai` client, exactly like the streamed answer the backend gave the first time."""

import os
import sys
import time

import openai

client = openai.OpenAI(base_url=os.environ["SLUICE_URL"] + "/v1", api_key=os.environ["SLUICE_KEY"])
MODEL = os.environ["SIM_MODEL"]
MESSAGES = [{"role": "user", "content": "Stream me something worth caching."}]


def stream(include_usage):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    text, finish, usage, ids = "", None, None, set()
    for chunk in raw.parse():
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return raw.headers.get("x-sluice-cache"), text, finish, usage, ids


def check(condition, message):
    if not condition:
        print("FAILED:", message)
        sys.exit(1)


status, text, finish, usage, first_ids = stream(include_usage=True)
check(status == "miss", f"first request: x-sluice-cache {status}")
check(text and finish in ("stop", "length"), f"first answer {text!r} {finish}")

for _ in range(100):
    cached = stream(include_usage=True)
    if cached[0] != "miss":
        break
    time.sleep(0.02)
status, cached_text, cached_finish, cached_usage, ids = cached
check(status == "hit", f"second request: x-sluice-cache {status}")
check(cached_text == text, f"cached text {cached_text!r} != {text!r}")
check(cached_finish == finish, f"finish {cached_finish} != {finish}")
check(len(ids) == 1 and ids != first_ids, f"chunk ids {ids} vs {first_ids}")
check(cached_usage is not None, "usage chunk asked for and missing")
check(cached_usage.prompt_tokens == usage.prompt_tokens, "prompt tokens differ")
check(cached_usage.completion_tokens == usage.completion_tokens, "completion tokens differ")

# Without include_usage: the same answer, and no usage chunk.
status, plain_text, _, plain_usage, _ = stream(include_usage=False)
check(status == "hit", f"third request: x-sluice-cache {status}")
check(plain_text == text and plain_usage is None, "stream without usage")

# The same question, not streamed: the same entry, as one JSON body.
raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
check(raw.headers.get("x-sluice-cache") == "hit", "non-streamed request of a streamed answer")
check(raw.parse().choices[0].message.content == text, "non-streamed content")
print("ALL OK")
