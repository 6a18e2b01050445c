"""How every component process runs: until SIGINT or SIGTERM, with a settled heap."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine

log = logging.getLogger(__name__)


def settle_heap() -> None:
    """Take what start-up built out of the cyclic collector's reach (`gc.freeze`).

    A started component holds tens of thousands of objects that live as long as
    it does (modules, classes, clients); without this every full collection walks
    them all, and every request in flight waits for it. Garbage first, so none is
    frozen; objects made later are collected as before."""
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen: %d objects out of garbage collection", gc.get_freeze_count())


async def until_signal() -> None:
    """Return at the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_until_signal(run: Coroutine, cleanup: Callable[[], Awaitable[None]]) -> None:
    """Run `run` until it ends or a signal comes; then always `await cleanup()`.

    An exception that ended `run` is raised again after the cleanup.
    """
    task = asyncio.create_task(run)
    stopper = asyncio.create_task(until_signal())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopper.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await cleanup()
