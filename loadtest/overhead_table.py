"""Turns bench-overhead.sh's results (JSON Lines of sluice-load reports) into the overhead
table in docs/benchmarks.md, replacing the section between its markers.

Per scenario and target: the median over rounds of throughput, p50 and p99 latency, and CPU
per request (the proxy's process CPU time over the run, and Redis's for Sluice on Redis,
divided by the requests sent, warm-up included, as the CPU was read around the whole run).
Then, per scenario: each Sluice's throughput as a fraction of nginx's, its CPU per request
as a multiple of bare pingora's, and the latency each proxy adds over the direct connection
(median of the per-round differences, so each difference comes from runs made back to
back)."""

import datetime
import json
import os
import platform
import statistics
import sys

results_path, out_path, command_line, rate, concurrency, low_rate = sys.argv[1:7]
runs = [json.loads(line) for line in open(results_path)]

scenarios = []
for r in runs:
    if r["scenario"] not in scenarios:
        scenarios.append(r["scenario"])


def pick(scenario, target):
    return {r["round"]: r["report"] for r in runs if r["scenario"] == scenario and r["target"] == target}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def lat(report, q):
    return report["latency_ms"][q] if report.get("latency_ms") else None


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def errors(reports):
    total = sum(sum(r["errors"].values()) for r in reports.values())
    return str(total)


TARGETS = [t for t in ("direct", "nginx", "pingora", "sluice", "sluice-embedded", "sluice-priced", "baseline", "baseline-redis") if any(r["target"] == t for r in runs)]


def cpu_us(run, field):
    ticks = run.get(field)
    sent = run["report"]["sent"]
    if ticks is None or not sent:
        return None
    return ticks / run["clk_tck"] / sent * 1e6


def runs_of(scenario, target):
    return {r["round"]: r for r in runs if r["scenario"] == scenario and r["target"] == target}


lines = []
lines.append("| scenario | target | throughput (req/s) | p50 (ms) | p99 (ms) | errors | added p50 vs direct (ms) | added p99 vs direct (ms) | CPU per request (µs) | Redis CPU per request (µs) |")
lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
summary = []
for scenario in scenarios:
    direct = pick(scenario, "direct")
    per_target = {}
    for target in TARGETS:
        reports = pick(scenario, target)
        if not reports and target != "direct":
            continue
        full = runs_of(scenario, target)
        rounds = sorted(reports)
        added50 = med([lat(reports[k], "p50") - lat(direct[k], "p50") for k in rounds if k in direct and lat(reports[k], "p50") is not None and lat(direct[k], "p50") is not None])
        added99 = med([lat(reports[k], "p99") - lat(direct[k], "p99") for k in rounds if k in direct and lat(reports[k], "p99") is not None and lat(direct[k], "p99") is not None])
        tput = med([reports[k]["throughput_rps"] for k in rounds])
        cpu = med([cpu_us(full[k], "proxy_ticks") for k in rounds]) if target != "direct" else None
        redis = med([cpu_us(full[k], "redis_ticks") for k in rounds]) if target in ("sluice", "baseline-redis") else None
        per_target[target] = (tput, added50, added99, reports, cpu)
        if not reports:
            continue
        lines.append(
            f"| {scenario} | {target} | {fmt(tput, 1)} | {fmt(med([lat(reports[k], 'p50') for k in rounds]))} | "
            f"{fmt(med([lat(reports[k], 'p99') for k in rounds]))} | {errors(reports)} | "
            f"{'' if target == 'direct' else fmt(added50)} | {'' if target == 'direct' else fmt(added99)} | "
            f"{'' if cpu is None else fmt(cpu, 0)} | {'' if redis is None else fmt(redis, 0)} |"
        )
    if scenario == "max hit":
        # A hit against the same target forwarding (max json): what answering from the cache
        # costs next to what forwarding does.
        for name in ("sluice", "sluice-embedded", "sluice-priced", "baseline", "baseline-redis"):
            hit = per_target.get(name)
            forwarded = [r for r in runs if r["scenario"] == "max json" and r["target"] == name]
            if not hit or not forwarded:
                continue
            fwd_tput = med([r["report"]["throughput_rps"] for r in forwarded])
            fwd_cpu = med([cpu_us(r, "proxy_ticks") for r in forwarded])
            hits = sum(r["report"].get("cache", {}).get("hit", 0) for r in runs_of(scenario, name).values())
            summary.append(
                f"- max hit, {name}: exact cache hits at {fmt(hit[0], 1)} req/s and {fmt(hit[4], 0)} µs of CPU "
                f"per request, against {fmt(fwd_tput, 1)} req/s and {fmt(fwd_cpu, 0)} µs forwarded (max json); "
                f"{hits} answers marked hit"
            )
        continue
    priced, unpriced = per_target.get("sluice-priced"), per_target.get("sluice-embedded")
    if priced and unpriced and None not in (priced[1], priced[2], unpriced[1], unpriced[2]):
        cpu_delta = None if None in (priced[4], unpriced[4]) else priced[4] - unpriced[4]
        summary.append(
            f"- {scenario}, cost on the answer (sluice-priced minus sluice-embedded): "
            f"p50 {fmt(priced[1] - unpriced[1])} ms, p99 {fmt(priced[2] - unpriced[2])} ms"
            + (f", CPU per request {fmt(cpu_delta, 0)} µs" if cpu_delta is not None else "")
        )
    nginx = per_target.get("nginx")
    pingora = per_target.get("pingora")
    for old_name, new_name, store in (("baseline", "sluice-embedded", "embedded"), ("baseline-redis", "sluice", "Redis")):
        baseline, current = per_target.get(old_name), per_target.get(new_name)
        if not (baseline and current and baseline[4] and current[4] is not None):
            continue
        ratios = [current[3][k]["throughput_rps"] / baseline[3][k]["throughput_rps"] for k in current[3] if k in baseline[3] and baseline[3][k]["throughput_rps"] > 0]
        summary.append(
            f"- {scenario}, this build against the baseline build ({store}): CPU per request "
            f"{fmt(current[4], 0)} vs {fmt(baseline[4], 0)} µs ({fmt(current[4] / baseline[4], 2)}×); "
            f"throughput {fmt(med(ratios), 3)}× (median of per-round ratios)"
            + (f"; p99 {fmt(current[2])} vs {fmt(baseline[2])} ms added" if None not in (current[2], baseline[2]) else "")
        )
    for name in ("sluice", "sluice-embedded", "sluice-priced", "baseline", "baseline-redis"):
        sluice = per_target.get(name)
        if not sluice or not nginx:
            continue
        ratios = [sluice[3][k]["throughput_rps"] / nginx[3][k]["throughput_rps"] for k in sluice[3] if k in nginx[3] and nginx[3][k]["throughput_rps"] > 0]
        p99_ratio = None
        if nginx[2] and sluice[2] is not None and nginx[2] > 0:
            p99_ratio = sluice[2] / nginx[2]
        cpu_ratio = None
        if pingora and pingora[4] and sluice[4] is not None:
            cpu_ratio = sluice[4] / pingora[4]
        summary.append(
            f"- {scenario}, {name}: throughput / nginx = {fmt(med(ratios))} (median of per-round ratios); "
            f"added p50 {fmt(sluice[1])} ms vs nginx {fmt(nginx[1])} ms; "
            f"added p99 {fmt(sluice[2])} ms vs nginx {fmt(nginx[2])} ms"
            + (f" ({fmt(p99_ratio, 2)}× nginx's)" if p99_ratio is not None else "")
            + (f"; CPU per request {fmt(cpu_ratio, 2)}× bare pingora's" if cpu_ratio is not None else "")
        )

cpu = "unknown CPU"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
section = "\n".join(
    [
        "<!-- overhead:begin (written by loadtest/bench-overhead.sh) -->",
        "## Gateway overhead: direct vs nginx vs bare pingora vs Sluice",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on "
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}.",
        "",
        f"Command: `{command_line}`",
        "",
        f"Fixed-rate scenarios send {rate} req/s (low: {low_rate} req/s) open loop; max scenarios "
        f"run {concurrency} closed-loop clients. Figures are medians over the rounds; each round "
        "runs direct, nginx, bare pingora (forwarding only, the gateway's pingora and allocator), "
        "Sluice on Redis, Sluice on the embedded store and the same with a price for the model "
        "(sluice-priced: answers carry their cost; a non-streamed one is held until its end "
        "for the x-sluice-cost header) back to back with the same load, each round starting "
        "one target further on than the last "
        "(Sluice: API-key auth, quotas with leases, metering, cache on, balancer, access log "
        "on). The json and stream requests are not cacheable (no temperature); max hit sends one "
        "deterministic request (temperature 0) again and again, answered from the cache after "
        "the warm-up's first. The load generator shares the "
        "machine's cores with the target, so max-throughput figures compare targets on equal "
        "terms, not absolute capacity."
        + (
            " baseline and baseline-redis: an earlier build's gateway (BASELINE in the command) on "
            "the embedded store and on Redis, in the same rounds, so that a change is measured "
            "against what it changed."
            if "baseline" in TARGETS
            else ""
        ),
        "",
        *lines,
        "",
        *summary,
        "<!-- overhead:end -->",
    ]
)

existing = open(out_path).read() if os.path.exists(out_path) else "# Benchmarks\n"
begin, end = "<!-- overhead:begin", "<!-- overhead:end -->"
if begin in existing and end in existing:
    head = existing[: existing.index(begin)]
    tail = existing[existing.index(end) + len(end):]
    text = head + section + tail
else:
    text = existing.rstrip("\n") + "\n\n" + section + "\n"
open(out_path, "w").write(text)
print("\n".join(lines + [""] + summary))
