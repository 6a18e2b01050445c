"""The ingress's query parsing equals aiohttp's on what its HTTP parser hands over."""

import asyncio
import json

from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeline.ingress.app import _query

from .test_validation import QUERIES


async def both(request: web.Request) -> web.Response:
    ours, theirs = _query(request), dict(request.query)
    return web.json_response([list(ours.items()), list(theirs.items())])


async def test_query_equals_aiohttp_on_raw_request_lines():
    app = web.Application()
    app.router.add_get("/postback", both)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        # raw bytes on the wire (a client library would re-encode the target)
        targets = [f"/postback?{q}".encode() for q in QUERIES]
        targets += [b"/postback?a=b&c=%C3%A9#frag", b"/postback", b"/postback?"]
        answered = 0
        for target in targets:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            if head.split(b" ", 2)[1] == b"400":
                continue  # the HTTP parser refuses it (raw non-ASCII, a space): no handler runs
            ours, theirs = json.loads(body)
            assert ours == theirs, target
            answered += 1
        assert answered == len(targets) - 1
    finally:
        await server.close()
