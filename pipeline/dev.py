"""`pipeline dev`: the whole pipeline on the embedded stack, in one command.

This process owns the embedded Kafka (a Tansu child) and the embedded
ClickHouse (chDB behind the HTTP interface, in this process), migrates the
warehouse, then runs each component as a child process with the resolved
endpoints. A child that dies is restarted; Ctrl-C (or SIGTERM) stops the
children first, then the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

import aiohttp
from aiohttp import web

from pipeline import services
from pipeline.config import Settings
from pipeline.embedded.kafka import die_with_parent

log = logging.getLogger(__name__)

COMPONENTS = ("sink", "worker", "callbacks", "ingress")


class Child:
    """One component process, restarted when it dies until `stop()`."""

    def __init__(self, name: str, argv: list[str]):
        self.name, self.argv = name, argv
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while not self.stopping:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent
            )
            started = time.monotonic()
            code = await self.proc.wait()
            if self.stopping:
                return
            log.error("%s exited with %s; restarting", self.name, code)
            # a crash loop should not spin the CPU
            await asyncio.sleep(1 if time.monotonic() - started > 10 else 3)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self, timeout: float = 15) -> None:
        self.stopping = True
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                log.warning("%s did not stop in %ss; killing", self.name, timeout)
                self.proc.kill()
                await self.proc.wait()
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def _echo_publisher(listen: str) -> web.AppRunner | None:
    """A loopback publisher for `pipeline dev` that prints every callback it gets."""

    async def receive(request: web.Request) -> web.Response:
        body = (await request.read()).decode(errors="replace")
        key = request.headers.get("Idempotency-Key", "")
        print(f"publisher got {request.method} {request.path_qs} {body} (key {key})", flush=True)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    try:
        await web.TCPSite(runner, host, int(port)).start()
    except OSError as e:
        log.warning("demo publisher not started on %s: %s", listen, e)
        await runner.cleanup()
        return None
    return runner


async def _wait_ready(url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(0.2)
    return False


async def run(
    settings: Settings, config_path: str, components=COMPONENTS, publisher: str | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with services.resolved(settings) as real:
        await services.migrate(real)
        base = [sys.executable, "-m", "pipeline", "--log-level", "INFO"]
        endpoints = ["--kafka", real.kafka_bootstrap, "--clickhouse", real.clickhouse_url]
        children = [
            Child(name, [*base, name, "--config", config_path, *endpoints]) for name in components
        ]
        echo = await _echo_publisher(publisher) if publisher else None
        for child in children:
            child.start()
        ingress = f"http://{settings.ingress_listen}"
        if await _wait_ready(f"{ingress}/readyz"):
            print(_banner(real, ingress), flush=True)
        else:
            log.error("the ingress did not become ready within 60s")
        await stop.wait()
        print("stopping...", flush=True)
        await asyncio.gather(*(child.stop() for child in reversed(children)))
        if echo is not None:
            await echo.cleanup()
    print("stopped.", flush=True)


def _banner(s: Settings, ingress: str) -> str:
    campaign = next(iter(s.campaigns), "c1")
    pub = next(iter(s.publishers), "net1")
    db = s.clickhouse_database
    return "\n".join(
        [
            "",
            "pipeline dev is up",
            f"  ingress     {ingress}   (/click/{{campaign}} /postback /healthz /readyz /metrics)",
            f"  kafka       {s.kafka_bootstrap}",
            f"  clickhouse  {s.clickhouse_url}   (database {db})",
            "",
            "try:",
            f"  curl -si '{ingress}/click/{campaign}?pub={pub}&sub1=hello'",
            f"  curl -s '{s.clickhouse_url}/?query=SELECT+outcome,count()+FROM+{db}.postbacks+FINAL"
            "+GROUP+BY+outcome'",
            "Ctrl-C stops everything.",
            "",
        ]
    )
