"""The Python openai client over HTTPS to the gateway, trusting only the test's CA: over
HTTP/1.1 and over HTTP/2 (ALPN), a plain answer and a stream each; and a client that does not
trust the CA is refused at the handshake.

env: SLUICE_URL (https://...), SLUICE_KEY, SLUICE_CA, SLUICE_MODEL
"""

import os

import openai

try:  # openai 3 is built on httpx2, earlier releases on httpx; the same API either way.
    import httpx2 as httpx
except ImportError:
    import httpx

url, key, ca, model = (os.environ[v] for v in ("SLUICE_URL", "SLUICE_KEY", "SLUICE_CA", "SLUICE_MODEL"))
messages = [{"role": "user", "content": "Say something over TLS."}]

for http2 in (False, True):
    with httpx.Client(verify=ca, http2=http2) as http:
        raw = http.post(
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": model, "messages": messages, "max_tokens": 8},
        )
        assert raw.status_code == 200, raw.text
        expected = "HTTP/2" if http2 else "HTTP/1.1"
        assert raw.http_version == expected, (raw.http_version, expected)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, http_client=http, max_retries=0)
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        assert answer.choices[0].message.content, answer
        assert answer.usage.total_tokens > 0, answer

        text, usage = "", None
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text, "the stream carried text"
        assert usage is not None and usage.completion_tokens > 0, usage
        print(f"{expected}: answer and stream ok")

try:
    with httpx.Client(http2=False) as untrusting:
        untrusting.get(f"{url}/health")
    raise AssertionError("a client without the CA connected")
except httpx.ConnectError as e:
    assert "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate" in str(e).lower(), e

print("ALL OK")
