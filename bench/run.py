"""Run every benchmark figure and report them: `python -m bench.run [--quick]`.

One Tansu broker and one embedded ClickHouse serve the whole run; each figure
starts the pipeline processes it measures (`python -m pipeline <component>`)
on its own topics and database, next to its baseline, so every ratio compares
two numbers taken minutes apart on the same machine. A figure that cannot be
measured says why instead of showing a number. Results go to
bench/results/latest.json and latest.md; logs of every process to
bench/results/work/; with --profile, py-spy profiles of each process under
test to bench/results/profiles/ (summaries printed at the end). Exits 1 when
a figure failed to run (not when a goal is missed: the table says that).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import callbacks, ingress, latency, profile, report, sink, worker
from bench.report import Figure, not_measured
from bench.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
# the order
ORDER = [
    "ingress postback",
    "ingress click",
    "worker",
    "latency",
    "state memory",
    "sink",
    "callbacks",
]


@dataclass(frozen=True)
class Mode:
    wrk_seconds: float
    connections: int
    clicks_small: int  # state memory: live clicks of the small point
    clicks_large: int  # worker throughput, and the large point
    sink_clicks: int
    callbacks: int  # conversions queued for the callbacks service
    callbacks_seconds: float  # at most this long timed
    latency_seconds: float
    capacity_seconds: float  # latency: the burst that measures the capacity, at the ceiling


FULL = Mode(10, 64, 100_000, 1_000_000, 500_000, 60_000, 20, 20, 10)
QUICK = Mode(3, 64, 8_000, 80_000, 120_000, 15_000, 5, 4, 3)


def guarded(names: list[str], goals: list[str], measure) -> list[Figure]:
    """Run one measurement; a failure becomes 'not measured' rows, not a crash."""
    started = time.monotonic()
    print(f"-- {', '.join(names)} ...", flush=True)
    try:
        figures = measure()
    except Exception as exc:  # noqa: BLE001 - reported in the table, and by the exit code
        traceback.print_exc()
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        figures = [not_measured(n, g, reason) for n, g in zip(names, goals, strict=True)]
        for f in figures:
            f.numbers["error"] = True
    for f in figures:
        print(
            f"   {f.name}: {report.shown(f.value)} (goal {f.goal})  {f.measured}  |  {f.baseline}",
            flush=True,
        )
    print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
    return figures


def rate_of(figures: list[Figure], name: str, *path: str) -> float | None:
    for f in figures:
        if f.name == name and f.value is not None:
            value = f.numbers
            for key in path:
                value = value[key]
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="same figures on less data")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each process under test (slower)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["ingress", "worker", "sink", "callbacks"],
        help="measure only these groups (repeatable; latency needs all of them)",
    )
    args = parser.parse_args(argv)
    only = set(args.only or ["ingress", "worker", "sink", "callbacks"])
    mode, name = (QUICK, "quick") if args.quick else (FULL, "full")
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    workdir, profiles = RESULTS / "work", RESULTS / "profiles"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(profiles, ignore_errors=True)
    header = {
        "mode": name,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "load_generator": f"wrk 4 (1 thread, {mode.connections} connections) for the ingress "
        "and the latency figure's capacity burst; Python clients in their own processes for "
        "callbacks (aiohttp) and the latency load (HTTP/1.1 over asyncio)",
        "settings": mode.__dict__,
        "profiled": args.profile,
        "only": sorted(only),
    }
    started = time.monotonic()
    stack = Stack(workdir, profiles if args.profile else None).start()
    figures: list[Figure] = []
    try:
        if "ingress" in only:
            figures += guarded(
                ["ingress postback", "ingress click"],
                [ingress.GOAL] * 2,
                lambda: ingress.measure(stack, mode.wrk_seconds, mode.connections),
            )
        if "worker" in only:
            figures += guarded(
                ["worker", "state memory"],
                [">= 0.25", "<= 1.5"],
                lambda: worker.measure(stack, mode.clicks_small, mode.clicks_large, not args.quick),
            )
        if "sink" in only:
            figures += guarded(["sink"], [">= 0.8"], lambda: sink.measure(stack, mode.sink_clicks))
        if "callbacks" not in only:
            pass
        elif callbacks.available():
            figures += guarded(
                ["callbacks"],
                [">= 0.5"],
                lambda: [
                    callbacks.measure_callbacks(stack, mode.callbacks, mode.callbacks_seconds)
                ],
            )
            capacities = [
                rate_of(figures, "ingress postback", "ingress", "ok_per_s"),
                # the worker figure is messages/s in a 10:1 click:postback mix; a postback
                # (join, conversion, txn check) is the expensive part: count postbacks only
                (rate_of(figures, "worker", "worker", "per_s") or 0) / 11,
                rate_of(figures, "callbacks", "callbacks", "per_s"),
            ]
            known = [c for c in capacities if c]
            if len(known) == len(capacities):
                args_ = (min(known), mode.latency_seconds, mode.capacity_seconds)
                # the quick run on Tansu, the full run on Apache Kafka, the reference broker
                measure = latency.measure_latency if args.quick else latency.on_reference
                figures += guarded(["latency"], ["<= 3"], lambda: [measure(stack, *args_)])
            else:
                figures.append(not_measured("latency", "<= 3", "capacity figures failed"))
        else:
            why = "callbacks service not available"
            figures += [
                not_measured("latency", "<= 3", why),
                not_measured("callbacks", ">= 0.5", why),
            ]
    finally:
        stack.close()
    header["seconds"] = round(time.monotonic() - started)
    figures.sort(key=lambda f: ORDER.index(f.name))
    # a partial run (--only) never replaces the full table
    stem = "latest" if args.only is None else "partial"
    text = report.write(figures, header, RESULTS, stem)
    print()
    print(text)
    print(f"written to {RESULTS / stem}.json and {stem}.md ({header['seconds']} s)")
    for folded in sorted(profiles.glob("*.folded")):
        text = profile.summary(folded)
        folded.with_suffix(".txt").write_text(text)
        print(text)
    return 1 if any(f.numbers.get("error") for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
