#!/usr/bin/env python3
"""Turns the sfu-load JSON reports of benches/side-by-side.sh into the markdown table that
docs/benchmarks.md quotes: per scenario, each server's number and the ratio ours/Janus.

usage: side_by_side_table.py OUT_DIR "SCENARIO..."
"""
import json
import pathlib
import sys

TITLES = {
    "1x50": "1 publisher → 50 subscribers",
    "1x100": "1 publisher → 100 subscribers",
    "1x200": "1 publisher → 200 subscribers",
    "meeting": "5 rooms × 5-person meeting",
}


def load(out, name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def metrics(r):
    """(label, value, unit format, better) per column; None when not measured."""
    if r is None:
        return None
    latency = r["media"]["latency_ms"]
    join = r["joins"]["join_time_ms"]
    return [
        ("forwarded packets per server CPU-second", r["server"]["packets_per_cpu_second"], "{:,.0f}", "higher"),
        ("server CPU while held (% of one core)", r["server"]["cpu_percent_hold"], "{:.0f}%", "lower"),
        ("loss", r["media"]["loss_pct"], "{:.3f}%", "lower"),
        ("join time p99 (ms)", join and join["p99"], "{:.0f}", "lower"),
        ("one-way latency p99 (ms)", latency and latency["p99"], "{:.1f}", "lower"),
        ("server RSS peak (MiB)", r["server"]["rss_bytes_peak"] and r["server"]["rss_bytes_peak"] / 2**20, "{:.0f}", "lower"),
    ]


def fmt(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def ratio(ours, janus):
    if ours is None or janus is None or janus == 0:
        return "n/a"
    return f"{ours / janus:.2f}"


def main():
    out = pathlib.Path(sys.argv[1])
    scenarios = sys.argv[2].split()
    print("| scenario | measure | ours | Janus | ours / Janus |")
    print("|---|---|---|---|---|")
    for scenario in scenarios:
        ours, janus = load(out, f"{scenario}-ours"), load(out, f"{scenario}-janus")
        mo, mj = metrics(ours), metrics(janus)
        rows = mo or mj or []
        for i, (label, _, pattern, better) in enumerate(rows):
            vo = mo[i][1] if mo else None
            vj = mj[i][1] if mj else None
            title = TITLES.get(scenario, scenario) if i == 0 else ""
            print(f"| {title} | {label} ({better} is better) | {fmt(vo, pattern)} | {fmt(vj, pattern)} | {ratio(vo, vj)} |")
    print()
    print("| run | verdict | joins | tracks received | packets received while held | server CPU-s while held | tester CPU while held | machine CPU while held |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in scenarios:
        for target in ("ours", "janus"):
            r = load(out, f"{scenario}-{target}")
            if r is None:
                print(f"| {scenario} {target} | no report | | | | | | |")
                continue
            t = r["tester"]
            print(
                f"| {scenario} {target} | {r['verdict']['line'].split(':')[0]} "
                f"| {r['joins']['succeeded']}/{r['joins']['planned']} "
                f"| {r['tracks']['received']}/{r['tracks']['expected']} "
                f"| {fmt(r['media']['packets_received_hold'], '{:,}')} "
                f"| {fmt(r['server']['cpu_seconds_hold'], '{:.2f}')} "
                f"| {fmt(t['cpu_percent_hold'], '{:.0f}%')} "
                f"| {fmt(t['machine_cpu_percent_hold'], '{:.0f}%')} of {t['machine_cores'] or '?'}00% |"
            )


if __name__ == "__main__":
    main()
