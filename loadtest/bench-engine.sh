#!/usr/bin/env bash
# The native engine on this machine's CPU, written into docs/benchmarks.md:
#  - the matrix products' GFLOP/s against the machine's peak (examples/gemm_speed.rs);
#  - SmolLM2-135M prefill and decode tokens/s, in process, at 1 and 16 sequences
#    (examples/llama_speed.rs);
#  - the same model served over HTTP (`sluice-load` against `sluice-backend`, streamed chat
#    replies of up to MAX_TOKENS) at 1 and 16 concurrent clients: continuous batching;
#  - all-MiniLM-L6-v2 embeddings per second over HTTP, one input per request, at 1 and 8
#    concurrent clients.
#
#   loadtest/bench-engine.sh
#   DURATION=40s MAX_TOKENS=64 loadtest/bench-engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DURATION="${DURATION:-40s}"
WARMUP="${WARMUP:-3s}"
MAX_TOKENS="${MAX_TOKENS:-64}"
# A question with a long answer, so that decoding, not prompts, is most of the work.
PROMPT="${PROMPT:-Tell me a long story about a river and the people who live along it.}"
OUT="${OUT:-docs/benchmarks.md}"
PORT="${PORT:-19500}"

[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p sluice-backend --examples
bench_setup
examples="${CARGO_TARGET_DIR:-target}/release/examples"
smollm2=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)
minilm=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)

"$examples/gemm_speed" | tee "$work/gemm.txt"
for n in 1 16; do "$examples/llama_speed" "$smollm2" "$n"; done | tee "$work/llama.txt"

"$bin/sluice-backend" --engine native --listen "127.0.0.1:$PORT" \
  --model "SmolLM2-135M-Instruct=$smollm2" --model "all-MiniLM-L6-v2=$minilm" \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$PORT/health" 120
load() { "$bin/sluice-load" run "http://127.0.0.1:$PORT" --duration "$DURATION" --warmup "$WARMUP" --json "$@"; }
for c in 1 16; do
  load --concurrency "$c" --model SmolLM2-135M-Instruct --stream --max-tokens "$MAX_TOKENS" \
    --prompt "$PROMPT" >"$work/chat-$c.json"
done
for c in 1 8; do
  load --concurrency "$c" --kind embeddings --model all-MiniLM-L6-v2 >"$work/embed-$c.json"
done

command_line="DURATION=$DURATION MAX_TOKENS=$MAX_TOKENS loadtest/bench-engine.sh"
python3 - "$work" "$command_line" "$MAX_TOKENS" <<'PY' | python3 loadtest/write-section.py engine "$OUT" loadtest/bench-engine.sh
import datetime, json, os, re, sys

work, command_line, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
mhz = max(float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", open("/proc/cpuinfo").read()))
cores = os.cpu_count()
peak = cores * mhz / 1000 * 32
gemm = [l for l in open(f"{work}/gemm.txt").read().splitlines() if "GFLOP/s" in l]
llama = open(f"{work}/llama.txt").read().splitlines()
chat = {c: json.load(open(f"{work}/chat-{c}.json")) for c in (1, 16)}
embed = {c: json.load(open(f"{work}/embed-{c}.json")) for c in (1, 8)}

def gflops(line):
    return float(re.search(r"([\d.]+) GFLOP/s", line).group(1))

out = [
    "## Native engine: matrix products, SmolLM2 and MiniLM on the CPU",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on "
    f"{cores} CPUs at {mhz:.0f} MHz with AVX2 and FMA: a peak of {peak:.0f} GFLOP/s in f32 "
    "(two 8-wide fused multiply-adds per core per cycle). Release build.",
    "",
    f"Command: `{command_line}`",
    "",
    "Matrix products (`cargo run --release -p sluice-backend --example gemm_speed`): dense f32 "
    "through `matrixmultiply` (the BERT path) and over Q4_1 weights (the Llama path) by the two "
    "kernels a token's kind picks: prompt tokens' rows as a GEMM over decoded 128-row tiles, a "
    "generated token's row by dot products.",
    "",
    "| product | GFLOP/s | share of peak |",
    "| --- | ---: | ---: |",
    *[f"| {l.split(':')[0]} | {gflops(l):.1f} | {gflops(l) / peak:.0%} |" for l in gemm],
    "",
    "SmolLM2-135M-Instruct (Q4_1 GGUF) in process "
    "(`cargo run --release -p sluice-backend --example llama_speed -- MODEL.gguf N`): N prompts "
    "of 128 tokens prefilled together in one forward pass, then 32 tokens decoded for all N "
    "together, one batched step per token.",
    "",
    "```",
    *llama,
    "```",
    "",
    f"Served over HTTP: `sluice-load run` against `sluice-backend` (streamed chat replies of up "
    f"to {max_tokens} tokens to a question with a long answer, default sampling, closed loop), "
    "so continuous batching decides what runs together:",
    "",
    "| clients | replies/s | output tokens/s | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | errors |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]
for c, r in chat.items():
    ttft, itl = r.get("ttft_ms") or {}, r.get("inter_token_ms") or {}
    out.append(
        f"| {c} | {r['throughput_rps']:.2f} | {r['output_tokens_per_sec']:.1f} | "
        f"{ttft.get('p50', 0):.0f} | {ttft.get('p99', 0):.0f} | {itl.get('p50', 0):.1f} | "
        f"{sum(r['errors'].values())} |"
    )
ratio = chat[16]["output_tokens_per_sec"] / max(chat[1]["output_tokens_per_sec"], 1e-9)
decode = [float(m) for m in re.findall(r"decode ([\d.]+) tokens/s", "\n".join(llama))]
in_process = decode[1] / decode[0] if len(decode) == 2 else float("nan")
out += [
    "",
    f"Continuous batching: in process, 16 sequences decode {in_process:.1f}× the tokens per "
    f"second of one; over HTTP, 16 clients get {ratio:.1f}× one client's output. One forward "
    "pass serves every running sequence, so the weights are read once per step, not once "
    "per sequence. Over HTTP the prompts are computed too (about 40 tokens each, in the "
    "same steps), the load generator shares the two CPUs, and replies of equal length end "
    "together, so new prompts arrive in waves (hence the TTFT at 16 clients).",
    "",
    "all-MiniLM-L6-v2 embeddings over HTTP, one short input per request (`--kind embeddings`):",
    "",
    "| clients | embeddings/s | latency p50 ms | latency p99 ms | errors |",
    "| ---: | ---: | ---: | ---: | ---: |",
]
for c, r in embed.items():
    lat = r.get("latency_ms") or {}
    out.append(
        f"| {c} | {r['throughput_rps']:.1f} | {lat.get('p50', 0):.1f} | {lat.get('p99', 0):.1f} | "
        f"{sum(r['errors'].values())} |"
    )
print("\n".join(out))
PY
