"""The client side of loadtest/bench-affinity.sh: chat requests with shared system prompts
through a gateway, timed to their first token of text; prints one JSON line per run.

    affinity_client.py GATEWAY_URL KEY BACKEND_URLS --strategy S --round N
        [--systems 12] [--words 700] [--requests 36]

The system prompts and the order of requests depend only on the arguments, so every
strategy and round gets the same sequence. Standard library only.
"""

import argparse
import concurrent.futures
import json
import random
import re
import statistics
import time
import urllib.parse
import urllib.request
import http.client

WORDS = (
    "river boat harbour ticket cabin deck captain season timetable bridge lock canal "
    "passenger luggage bicycle dog cafe breakfast lunch dinner sunset morning evening "
    "weather rain wind storm calm delay refund booking change cancel group child student "
    "senior discount map tour guide museum castle village town city island lake forest "
    "mountain valley path station bus train taxi parking access ramp lift toilet shop"
).split()
QUESTIONS = [
    "When does the first boat leave?",
    "Can I bring my bicycle?",
    "Is there a cafe on board?",
    "How do I change my booking?",
    "Are dogs allowed?",
    "What happens if it rains?",
]


def system_prompts(count, words):
    rng = random.Random(1)
    prompts = []
    for i in range(count):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        prompts.append(f"Desk {i}: you answer for the river company number {i}. Notes: {body}.")
    return prompts


def first_token_ms(url, key, system, question):
    """Milliseconds to the first token of text, and the prompt's tokens."""
    body = json.dumps({
        "model": "smollm2",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body,
                 {"content-type": "application/json", "authorization": f"Bearer {key}"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:200]!r}")
    ttft, prompt_tokens = None, 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            prompt_tokens = chunk["usage"]["prompt_tokens"]
        for choice in chunk.get("choices", []):
            if ttft is None and choice.get("delta", {}).get("content"):
                ttft = (time.perf_counter() - start) * 1000
    conn.close()
    return ttft, prompt_tokens


def hits(backends):
    total = 0.0
    for url in backends:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        for m in re.finditer(r'^sluice_backend_engine_prefix_cache_hit_tokens_total\{[^}]*\} (\S+)$',
                             text, re.M):
            total += float(m.group(1))
    return total


def run(url, key, jobs):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(first_token_ms, url, key, s, q) for s, q in jobs]
        results, errors = [], 0
        for f in futures:
            try:
                results.append(f.result())
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
        return results, errors


def main():
    args = argparse.ArgumentParser()
    args.add_argument("url")
    args.add_argument("key")
    args.add_argument("backends")
    args.add_argument("--strategy", required=True)
    args.add_argument("--round", type=int, required=True)
    args.add_argument("--systems", type=int, default=12)
    args.add_argument("--words", type=int, default=700)
    args.add_argument("--requests", type=int, default=36)
    args = args.parse_args()
    backends = args.backends.split(",")
    systems = system_prompts(args.systems, args.words)
    order = random.Random(2)
    warm = [(s, QUESTIONS[0]) for s in order.sample(systems, len(systems))]
    timed = [(order.choice(systems), order.choice(QUESTIONS)) for _ in range(args.requests)]
    run(args.url, args.key, warm)
    before = hits(backends)
    results, errors = run(args.url, args.key, timed)
    found = hits(backends) - before
    ttfts = sorted(t for t, _ in results if t is not None)
    prompt_tokens = sum(p for _, p in results)
    print(json.dumps({
        "strategy": args.strategy,
        "round": args.round,
        "systems": args.systems,
        "system_tokens": int(statistics.median(p for _, p in results)) if results else 0,
        "requests": len(results),
        "errors": errors,
        "ttft_ms": {
            "p50": statistics.median(ttfts),
            "p90": ttfts[int(0.9 * (len(ttfts) - 1))],
            "mean": statistics.fmean(ttfts),
        },
        "hit_share": found / max(prompt_tokens, 1),
    }))


if __name__ == "__main__":
    main()
