"""Ingress figures: requests per second of one `pipeline ingress` process
against the same load on bare aiohttp handlers (`bench.bare`).

- ingress postback: `GET /postback` with valid parameters (click IDs signed
  with the config's secret), each answered only once the record is in Kafka
  with acks=all; only 2xx answers count, and the postbacks topic must have
  grown by at least that many records.
- ingress click: `GET /click/c1?pub=net1&sub1=..`, 302 redirects (wrk never
  follows them), each click published to Kafka before the answer.

The load generator is wrk (one thread, the same connections and duration for
both servers), a process of its own; each measurement follows a 1 s warm-up.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from bench import data
from bench.report import Figure
from bench.stack import CpuMeter, Stack, cores_text, wait_http
from pipeline.embedded.kafka import free_port

LUA = Path(__file__).resolve().parent / "wrk.lua"
POSTBACK_PATH = "/postback?token=adv-secret&event=install&click_id="
CLICK_PATH = "/click/c1?pub=net1&sub1=bench&sub2=ios"
GOAL = ">= 0.7"


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


def load(base: str, path: str, seconds: float, connections: int, ids=None, watch=None):
    wrk(base, path, 1, connections, ids)  # warm-up: connections, producer batches, caches
    return wrk(base, path, seconds, connections, ids, watch)


def _describe(r: dict) -> str:
    return (
        f"{r['ok_per_s']:,.0f} req/s ({r['ok']:,} ok, p50 {r['p50_us'] / 1000:.1f} ms, "
        f"p99 {r['p99_us'] / 1000:.1f} ms; {cores_text(r['cpu'])})"
    )


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
    bare_url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(f"{bare_url}postback", 30, bare)
        watch = {"bare": bare.pid}
        base_pb = load(bare_url, POSTBACK_PATH, seconds, connections, ids, watch)
        base_click = load(bare_url, CLICK_PATH, seconds, connections, watch=watch)
    finally:
        stack.stop(bare)

    ingress = stack.pipeline("ingress", config_path)
    url = f"http://{settings.ingress_listen}/"
    try:
        wait_http(f"{url}readyz", 60, ingress)
        wrk(url, POSTBACK_PATH, 1, connections, ids)  # warm-up outside the count below
        before = asyncio.run(data.end_offsets(settings, "postbacks"))
        watch = {"ingress": ingress.pid, "broker": stack.kafka.proc.pid}
        stack.profile(ingress, seconds, "-postback")
        pb = wrk(url, POSTBACK_PATH, seconds, connections, ids, watch)
        stored = asyncio.run(data.end_offsets(settings, "postbacks")) - before
        wrk(url, CLICK_PATH, 1, connections)
        stack.profile(ingress, seconds, "-click")
        click = wrk(url, CLICK_PATH, seconds, connections, watch=watch)
        ingress.check()
    finally:
        stack.stop(ingress)

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
            note=f"{connections} connections, {seconds:g} s; {pb_note}",
            numbers={"ingress": pb, "bare": base_pb, "records_in_topic": stored},
        ),
        Figure(
            "ingress click",
            GOAL,
            value=click["ok_per_s"] / base_click["ok_per_s"],
            measured=_describe(click),
            baseline=f"bare aiohttp: {_describe(base_click)}",
            note=f"{connections} connections, {seconds:g} s; {click_note}",
            numbers={"ingress": click, "bare": base_click},
        ),
    ]
