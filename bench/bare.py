"""The baseline server of the ingress figures: bare aiohttp handlers, no work.

`/postback` answers the same JSON an accepted postback gets, `/click/{id}` the
same kind of 302; served the way `pipeline ingress` serves (AppRunner, no
access log, backlog 1024), so the difference is the pipeline's own work.
Run as `python -m bench.bare --listen 127.0.0.1:PORT` until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

POSTBACK_BODY = {"status": "accepted", "postback_id": "0" * 32}


async def postback(request: web.Request) -> web.Response:
    return web.json_response(POSTBACK_BODY)


async def click(request: web.Request) -> web.Response:
    location = "https://apps.example/app/id123?clickid=x&pub=net1"
    return web.Response(status=302, headers={"Location": location, "X-Click-Id": "x"})


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/postback", postback)
    app.router.add_get("/click/{campaign_id}", click)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT")
    host, _, port = parser.parse_args().listen.rpartition(":")
    asyncio.run(serve(host, int(port)))


if __name__ == "__main__":
    main()
