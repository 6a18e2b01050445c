"""`pipeline dev`: the whole pipeline on the embedded stack, in one command.

This process owns the embedded Kafka (a Tansu child) and the embedded
ClickHouse (chDB behind the HTTP interface, in this process), migrates the
warehouse, then runs each component as a child process with the resolved
endpoints, as a supervisor would:

- a child that exits is restarted after a backoff that doubles from
  `BACKOFF_FIRST` up to `BACKOFF_MOST` seconds, and starts again from the first
  once the child has stayed up for `HEALTHY_AFTER` seconds;
- a child that exits `CRASHES` times within `CRASH_WINDOW` seconds, or exits 2
  (a configuration or install error, which no restart mends), stops the whole
  pipeline: its last lines are printed and `pipeline dev` exits non-zero;
- while any child is down, the ingress's `/readyz` answers 503 naming it (the
  status file `--dev-status` hands the ingress).

Every child's output goes through this process, prefixed with its name. Ctrl-C
(or SIGTERM) stops the children first, then the stack.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from pipeline.config import Settings
from pipeline.dev.clickhouse import EmbeddedClickHouse
from pipeline.dev.kafka import EmbeddedKafka, die_with_parent, port_open
from pipeline.sink import migrations

log = logging.getLogger(__name__)

COMPONENTS = ("sink", "worker", "callbacks", "ingress")
BACKOFF_FIRST, BACKOFF_MOST = 0.5, 30.0
HEALTHY_AFTER = 30.0
CRASHES, CRASH_WINDOW = 5, 60.0
LAST_LINES = 30
CONFIG_ERROR = 2  # what `pipeline <component>` exits with for a config or install error


class CrashLoop(Exception):
    """A child cannot be kept up: the pipeline stops."""

    def __init__(self, name: str, why: str, last_lines: list[str]):
        super().__init__(f"{name} {why}")
        self.name, self.why, self.last_lines = name, why, last_lines


class Child:
    """One component process, restarted with backoff until `stop()` or a crash loop."""

    def __init__(self, name: str, argv: list[str], changed):
        self.name, self.argv = name, argv
        self.changed = changed  # called when the child goes up or down
        self.proc: asyncio.subprocess.Process | None = None
        self.up = False
        self.stopping = False
        self.lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)
        self.exits: collections.deque[float] = collections.deque(maxlen=CRASHES)

    async def run(self) -> None:
        """Keep the child running; raises CrashLoop when it cannot be kept up."""
        backoff = BACKOFF_FIRST
        while not self.stopping:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            started = time.monotonic()
            self._set_up(True)
            await self._echo(self.proc.stdout)
            code = await self.proc.wait()
            self._set_up(False)
            if self.stopping:
                return
            now = time.monotonic()
            self.exits.append(now)
            if code == CONFIG_ERROR:
                raise CrashLoop(self.name, f"exited with {code}", list(self.lines))
            if len(self.exits) == CRASHES and now - self.exits[0] <= CRASH_WINDOW:
                raise CrashLoop(
                    self.name,
                    f"exited {CRASHES} times within {CRASH_WINDOW:g}s (last code {code})",
                    list(self.lines),
                )
            if now - started >= HEALTHY_AFTER:
                backoff = BACKOFF_FIRST
            log.error("%s exited with %s; restarting in %.1fs", self.name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MOST)

    async def _echo(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            print(f"{self.name:>9} | {text}", flush=True)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.changed()

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


@contextlib.asynccontextmanager
async def embedded_stack(settings: Settings):
    """Yield settings with real endpoints, starting the embedded broker and ClickHouse
    where the config says "embedded" (and nothing serves them yet)."""
    kafka, ch = settings.kafka_bootstrap, settings.clickhouse_url
    owned_kafka = owned_ch = None
    try:
        if kafka == "embedded":
            host, _, port = settings.kafka_embedded_listen.rpartition(":")
            if int(port) and port_open(host, int(port)):
                kafka = settings.kafka_embedded_listen
            else:
                owned_kafka = EmbeddedKafka(settings.kafka_embedded_listen)
                owned_kafka.launch()  # on this thread: the child dies with it, see launch()
                kafka = await asyncio.to_thread(owned_kafka.wait_ready)
                log.info("embedded Kafka (Tansu) on %s", kafka)
        if ch == "embedded":
            host, _, port = settings.clickhouse_embedded_listen.rpartition(":")
            if int(port) and port_open(host, int(port)):
                ch = f"http://{settings.clickhouse_embedded_listen}"
            else:
                owned_ch = EmbeddedClickHouse(settings.clickhouse_embedded_path, host, int(port))
                await owned_ch.start()
                ch = owned_ch.url
                log.info("embedded ClickHouse (chDB) on %s", ch)
        yield settings.with_endpoints(kafka=kafka, clickhouse=ch)
    finally:
        if owned_ch is not None:
            await owned_ch.stop()
        if owned_kafka is not None:
            await asyncio.to_thread(owned_kafka.stop)


def _write_status(path: Path, children: list[Child]) -> None:
    """Atomically: which children are down (the ingress's /readyz reads it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"down": [c.name for c in children if not c.up]}))
    os.replace(tmp, path)


async def run(
    settings: Settings,
    config_path: str,
    components=COMPONENTS,
    publisher: str | None = None,
    log_args: tuple[str, ...] = ("--log-level", "INFO"),
) -> int:
    """Run until Ctrl-C (returns 0) or a child's crash loop (returns 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    status = Path(settings.spool_dir).parent / f"dev-status-{os.getpid()}.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    failure: CrashLoop | None = None
    async with embedded_stack(settings) as real:
        await asyncio.to_thread(migrations.run, real)
        base = [sys.executable, "-m", "pipeline", *log_args]
        endpoints = ["--kafka", real.kafka_bootstrap, "--clickhouse", real.clickhouse_url]
        children: list[Child] = []

        def changed() -> None:
            _write_status(status, children)

        for name in components:
            extra = ["--dev-status", str(status)] if name == "ingress" else []
            argv = [*base, name, "--config", config_path, *endpoints, *extra]
            children.append(Child(name, argv, changed))
        changed()
        echo = await _echo_publisher(publisher) if publisher else None
        runs = [asyncio.create_task(child.run()) for child in children]
        stopped = asyncio.create_task(stop.wait())
        ingress = f"http://{settings.ingress_listen}"
        if "ingress" in components:
            ready = asyncio.create_task(_wait_ready(f"{ingress}/readyz"))
            await asyncio.wait([ready, stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and ready.result():
                print(_banner(real, ingress), flush=True)
            elif not ready.done():
                ready.cancel()
        done, _ = await asyncio.wait([stopped, *runs], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped and isinstance(task.exception(), CrashLoop):
                failure = task.exception()
        print("stopping...", flush=True)
        await asyncio.gather(*(child.stop() for child in reversed(children)))
        for task in [*runs, stopped]:
            task.cancel()
        await asyncio.gather(*runs, stopped, return_exceptions=True)
        if echo is not None:
            await echo.cleanup()
    status.unlink(missing_ok=True)
    if failure is not None:
        print(f"pipeline dev: {failure}; its last lines:", file=sys.stderr)
        for line in failure.last_lines:
            print(f"  {failure.name} | {line}", file=sys.stderr)
        print("pipeline dev: stopped because a component cannot be kept up", file=sys.stderr)
        return 1
    print("stopped.", flush=True)
    return 0


def main(settings: Settings, args) -> None:
    """`pipeline dev`."""
    log_args = ("--log-level", args.log_level, "--log-format", args.log_format)
    code = asyncio.run(
        run(settings, args.config, publisher=args.publisher or None, log_args=log_args)
    )
    sys.exit(code)


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
