"""The baseline server of the ingress figures: bare aiohttp handlers, no work.

`/postback` answers the same JSON an accepted postback gets, `/click/{id}` the
same kind of 302; served the way `pipeline ingress` serves (AppRunner, no
access log, backlog 1024), so the difference is the pipeline's own work.
Run as `python -m bench.bare --listen 127.0.0.1:PORT` until SIGTERM.
"""

from __future__ import annotations

from aiohttp import web

from bench import serve

POSTBACK_BODY = {"status": "accepted", "postback_id": "0" * 32}


async def postback(request: web.Request) -> web.Response:
    return web.json_response(POSTBACK_BODY)


async def click(request: web.Request) -> web.Response:
    location = "https://apps.example/app/id123?clickid=x&pub=net1"
    return web.Response(status=302, headers={"Location": location, "X-Click-Id": "x"})


def build() -> web.Application:
    app = web.Application()
    app.router.add_get("/postback", postback)
    app.router.add_get("/click/{campaign_id}", click)
    return app


if __name__ == "__main__":
    serve.main("python -m bench.bare", build)
