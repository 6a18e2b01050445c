"""Pieces of a running pipeline for integration tests: the ingress and the sink
in-process, other components as subprocesses, ClickHouse polling."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from clickhouse_connect.driver.exceptions import DatabaseError

from pipeline.dev.kafka import die_with_parent
from pipeline.ingress import app as ingress_app
from pipeline.sink import app as sink_app

from .conftest import wait_until


@contextlib.asynccontextmanager
async def serving(settings):
    """The ingress as `pipeline ingress` serves it (its runner), on a free loopback
    port; yields (host, port)."""
    runner = ingress_app.runner(ingress_app.build_app(settings), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][:2]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def ingress(settings):
    """The ingress on a free loopback port; yields an aiohttp session bound to it."""
    async with serving(settings) as (host, port):
        async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
            yield http


@contextlib.asynccontextmanager
async def sink(settings):
    s = sink_app.build(settings)
    await s.start()
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await s.stop()


def start_component(name: str, config_path: Path, log_path: Path) -> subprocess.Popen:
    """`python -m pipeline <name>` with its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", name, "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def stop_component(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def rows_eventually(ch, sql: str, expected_count: int, timeout: float = 60):
    """Poll ClickHouse until `sql` returns at least `expected_count` rows. A database or
    table not there yet counts as no rows: the sink creates them when it starts, which
    can be after the first rows were sent."""

    def check():
        try:
            result = ch.query(sql).result_rows
        except DatabaseError as e:
            if "UNKNOWN_DATABASE" in str(e) or "UNKNOWN_TABLE" in str(e):
                return None
            raise
        return result if len(result) >= expected_count else None

    return await asyncio.to_thread(
        wait_until, check, timeout, 0.3, f"{expected_count} rows from {sql}"
    )
