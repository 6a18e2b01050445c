"""Run a small aiohttp app on loopback until SIGINT/SIGTERM (the bench's own servers)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

from pipeline.runtime import settle_heap


async def serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    settle_heap()  # as the pipeline's components do
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(prog: str, build: Callable[[], web.Application]) -> None:
    """`python -m <prog> --listen 127.0.0.1:PORT`: serve `build()` there."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT")
    host, _, port = parser.parse_args().listen.rpartition(":")
    asyncio.run(serve(build(), host, int(port)))
