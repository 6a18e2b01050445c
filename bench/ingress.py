"""Ingress figures: requests per second of one `pipeline ingress` process
against the same load on bare aiohttp handlers (`bench.bare`).

- ingress postback: `GET /postback` with valid parameters (click IDs signed
  with the config's secret), each answered only once the record is in Kafka
  with acks=all; only 2xx answers count, and the postbacks topic must have
  grown by at least that many records.
- ingress click: `GET /click/c1?pub=net1&sub1=..`, 302 redirects (wrk never
  follows them), each click published to Kafka before the answer.

The load generator is wrk (one thread, the same connections and duration for
both servers), a process of its own. Both servers run side by side, each idle
while the other is loaded, and each figure's load goes to them in turns of at
most 5 s (bare, ingress, bare, ingress): a slow spell of the shared machine
longer than a turn then falls on both sides of the ratio, not on one
(`bench/NOTES.md`, "The ingress figures in turns"). Each server takes a 1 s
warm-up per figure first.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

from bench import data
from bench.report import Figure
from bench.stack import CpuMeter, Stack, cores_text, wait_http
from pipeline.dev.kafka import free_port

LUA = Path(__file__).resolve().parent / "wrk.lua"
POSTBACK_PATH = "/postback?token=adv-secret&event=install&click_id="
CLICK_PATH = "/click/c1?pub=net1&sub1=bench&sub2=ios"
GOAL = ">= 0.7"
TURN_S = 5  # at most this long on one server before the other's turn


def wrk_argv(
    base: str,
    path: str,
    seconds: float,
    connections: int,
    ids: Path | None = None,
    once: bool = False,
) -> list[str]:
    """wrk's command line: GET `path` (+ a click ID of `ids` each, cycling, or
    each once with `once`, then /healthz: wrk then idles until SIGINT)."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        base,
        "--",
        path,
    ]
    if ids is not None:
        argv.append(str(ids))
        if once:
            argv.append("once")
    return argv


def wrk_summary(stdout: str, stderr: str) -> dict:
    """The JSON line wrk.lua prints, plus `ok` and `ok_per_s` (2xx/3xx answers)."""
    line = next((x for x in stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout}\n{stderr}")
    result = json.loads(line.removeprefix("WRKJSON "))
    ok = result["requests"] - result["status_errors"]
    result["ok"] = ok
    result["ok_per_s"] = ok / (result["duration_us"] / 1e6)
    return result


def wrk(
    base: str,
    path: str,
    seconds: float,
    connections: int,
    ids: Path | None = None,
    watch: dict[str, int] | None = None,
) -> dict:
    """One wrk run; returns its summary with `ok_per_s` (2xx/3xx answers per
    second) and `cpu`, the cores used by the `watch` processes and by wrk."""
    argv = wrk_argv(base, path, seconds, connections, ids)
    meter = CpuMeter(watch or {}, children=True).start()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    cpu = meter.stop()
    result = wrk_summary(out.stdout, out.stderr)
    result["cpu"] = cpu
    return result


Servers = dict[str, tuple[str, dict[str, int]]]  # name -> (base URL, processes to watch)


def warm_up(servers: Servers, path: str, connections: int, ids: Path | None = None) -> None:
    """1 s of the load on each server: connections, producer batches, caches."""
    for base, _ in servers.values():
        wrk(base, path, 1, connections, ids)


def turns(
    servers: Servers, path: str, seconds: float, connections: int, ids: Path | None = None
) -> dict[str, dict]:
    """`seconds` of load on each server, in turns of at most TURN_S whole seconds
    (wrk's -d), the servers in order each turn. Returns each server's turns
    combined (`combine`)."""
    count = max(1, math.ceil(seconds / TURN_S))
    each = max(1, round(seconds / count))
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(count):
        for name, (base, watch) in servers.items():
            runs[name].append(wrk(base, path, each, connections, ids, watch))
    return {name: combine(rs) for name, rs in runs.items()}


_COUNTS = (
    "requests",
    "duration_us",
    "ok",
    "status_errors",
    "connect_errors",
    "read_errors",
    "write_errors",
    "timeouts",
)


def combine(runs: list[dict]) -> dict:
    """wrk summaries of one server's turns as one: the counts summed, `ok_per_s`
    over the summed durations, the CPU averaged (the turns are equally long), each
    percentile as the lowest and highest of the turns', and the turns themselves."""
    out = {k: sum(r[k] for r in runs) for k in _COUNTS}
    out["ok_per_s"] = out["ok"] / (out["duration_us"] / 1e6)
    for q in ("p50", "p99"):
        values = [r[f"{q}_us"] for r in runs]
        out[f"{q}_range_us"] = (min(values), max(values))
    out["cpu"] = {k: sum(r["cpu"][k] for r in runs) / len(runs) for k in runs[0]["cpu"]}
    out["turns"] = runs
    return out


def _ms(range_us: tuple[int, int]) -> str:
    low, high = (f"{us / 1000:.1f}" for us in range_us)
    return f"{low} ms" if low == high else f"{low}-{high} ms"


def _describe(r: dict) -> str:
    return (
        f"{r['ok_per_s']:,.0f} req/s ({r['ok']:,} ok, p50 {_ms(r['p50_range_us'])}, "
        f"p99 {_ms(r['p99_range_us'])}; {cores_text(r['cpu'])})"
    )


def _turns_text(r: dict) -> str:
    runs = r["turns"]
    each = (
        f"{len(runs)} turns of {r['duration_us'] / len(runs) / 1e6:.0f} s"
        if len(runs) > 1
        else "one turn"
    )
    return f"{r['duration_us'] / 1e6:.0f} s in {each}, taken in turn with the bare handler's"


def _errors(r: dict) -> str:
    kinds = ("status", "connect", "read", "write", "timeouts")
    counts = {k: r[k if k == "timeouts" else f"{k}_errors"] for k in kinds}
    shown = ", ".join(f"{n:,} {k}" for k, n in counts.items() if n)
    return f"; ERRORS: {shown}" if shown else ""


def measure(stack: Stack, seconds: float, connections: int) -> list[Figure]:
    config_path, settings = stack.config("ingress")
    ids = stack.workdir / "click-ids.txt"
    ids.write_text("\n".join(data.click_ids(settings, 20000)) + "\n")

    port = free_port()
    bare = stack.spawn(
        "bare", [sys.executable, "-m", "bench.bare", "--listen", f"127.0.0.1:{port}"]
    )
    ingress = None
    try:
        bare_url = f"http://127.0.0.1:{port}/"
        wait_http(f"{bare_url}postback", 30, bare)
        ingress = stack.pipeline("ingress", config_path)
        url = f"http://{settings.ingress_listen}/"
        wait_http(f"{url}readyz", 60, ingress)
        servers = {
            "bare": (bare_url, {"bare": bare.pid}),
            "ingress": (url, {"ingress": ingress.pid, "broker": stack.kafka.proc.pid}),
        }
        warm_up(servers, POSTBACK_PATH, connections, ids)
        before = asyncio.run(data.end_offsets(settings, "postbacks"))
        stack.profile(ingress, 2 * seconds, "-postback")
        pb = turns(servers, POSTBACK_PATH, seconds, connections, ids)
        stored = asyncio.run(data.end_offsets(settings, "postbacks")) - before
        warm_up(servers, CLICK_PATH, connections)
        stack.profile(ingress, 2 * seconds, "-click")
        click = turns(servers, CLICK_PATH, seconds, connections)
        ingress.check()
    finally:
        if ingress is not None:
            stack.stop(ingress)
        stack.stop(bare)

    base_pb, pb = pb["bare"], pb["ingress"]
    base_click, click = click["bare"], click["ingress"]
    pb_note = f"{stored:,} records reached the postbacks topic during the run"
    if stored < pb["ok"]:
        pb_note += f" - FEWER than the {pb['ok']:,} accepted answers"
    pb_note += _errors(pb)
    click_note = "302 answers, not followed" + _errors(click)
    return [
        Figure(
            "ingress postback",
            GOAL,
            value=pb["ok_per_s"] / base_pb["ok_per_s"],
            measured=_describe(pb),
            baseline=f"bare aiohttp: {_describe(base_pb)}",
            note=f"{connections} connections, {_turns_text(pb)}; {pb_note}",
            numbers={"ingress": pb, "bare": base_pb, "records_in_topic": stored},
        ),
        Figure(
            "ingress click",
            GOAL,
            value=click["ok_per_s"] / base_click["ok_per_s"],
            measured=_describe(click),
            baseline=f"bare aiohttp: {_describe(base_click)}",
            note=f"{connections} connections, {_turns_text(click)}; {click_note}",
            numbers={"ingress": click, "bare": base_click},
        ),
    ]
