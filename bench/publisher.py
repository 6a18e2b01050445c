"""A fast loopback publisher for the callback figures: answers every request
200 at once and remembers when each callback arrived.

The key of a callback is its `click` query parameter (the example config's
net1 template sends `click={sub1}`), else `sub1` or `click_id` of a JSON body.
`GET /_stats` answers {"count": deliveries received, "keys": keys received},
`GET /_received` the
first arrival time (Unix seconds) of each key. Run as
`python -m bench.publisher --listen 127.0.0.1:PORT` until SIGTERM.
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from bench import serve

RECEIVED = web.AppKey("received", dict)
COUNT = web.AppKey("count", list)


async def callback(request: web.Request) -> web.Response:
    now = time.time()
    key = request.query.get("click")
    if key is None and request.can_read_body:
        try:
            body = json.loads(await request.read())
            key = str(body.get("sub1") or body.get("click_id"))
        except (ValueError, AttributeError):
            key = None
    request.app[COUNT][0] += 1
    if key is not None:
        request.app[RECEIVED].setdefault(key, now)
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response({"count": app[COUNT][0], "keys": len(app[RECEIVED])})


async def received(request: web.Request) -> web.Response:
    return web.json_response(request.app[RECEIVED])


def build() -> web.Application:
    app = web.Application()
    app[RECEIVED], app[COUNT] = {}, [0]
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_received", received)
    app.router.add_route("*", "/{tail:.*}", callback)
    return app


if __name__ == "__main__":
    serve.main("python -m bench.publisher", build)
