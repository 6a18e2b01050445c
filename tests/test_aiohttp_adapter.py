"""What pipeline.adapters.aiohttp relies on in aiohttp, pinned: requests its parser
refuses reach `on_bad_request` with their request line and get that answer; a
handler's exception is a JSON 500; aiohttp's own text/plain answer and its
ERROR line with the request's bytes never appear. A loopback server, no broker."""

import asyncio
import contextlib
import json
import logging

import pytest
from aiohttp import web

from pipeline.adapters.aiohttp import BadRequest, Runner, request_line

SECRET = "tok-SECRET-123"


@contextlib.asynccontextmanager
async def serve(seen: list[BadRequest]):
    async def boom(request):
        raise RuntimeError("handler bug")

    async def ok(request):
        await request.read()
        return web.json_response({"ok": True})

    async def on_bad_request(bad: BadRequest) -> web.Response:
        seen.append(bad)
        return web.json_response({"error": "invalid_request", "detail": bad.reason}, status=400)

    app = web.Application()
    app.router.add_get("/boom", boom)
    app.router.add_route("*", "/postback", ok)
    runner = Runner(app, on_bad_request, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][:2]
    finally:
        await runner.cleanup()


async def exchange(address, data: bytes) -> tuple[int, str, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


BAD = [
    (b"GET /postback?token=" + SECRET.encode() + b" HTTP/1.1 extra\r\nHost: x\r\n\r\n", "GET"),
    (b"G@T /postback?token=" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n", "G@T"),
    (b"GET /postback?token=" + SECRET.encode() + b"&x=" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", ""),
    (b"POST /postback?token=" + SECRET.encode() + b" HTTP/1.1\r\nBad Header\r\n\r\n", "POST"),
    (
        b"POST /postback?token=" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "POST",
    ),
    (b"GET /postback HTTP/1.1\r\nHost: x\r\nX: " + b"h" * 9000 + b"\r\n\r\n", "GET"),
]


@pytest.mark.parametrize("data,method", BAD, ids=range(len(BAD)))
async def test_a_refused_request_is_answered_by_on_bad_request(data, method, caplog):
    seen: list[BadRequest] = []
    caplog.set_level(logging.DEBUG)
    async with serve(seen) as address:
        status, content_type, body = await exchange(address, data)
    assert status == 400 and content_type.startswith("application/json"), body
    assert json.loads(body)["error"] == "invalid_request"
    assert len(seen) == 1
    if method:
        assert seen[0].method == method and seen[0].target.startswith("/postback")
    assert seen[0].remote == "127.0.0.1"
    assert SECRET not in seen[0].reason
    assert SECRET not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_keep_alive_connection_names_the_refused_request():
    seen: list[BadRequest] = []
    async with serve(seen) as address:
        status, _, _ = await exchange(
            address,
            b"GET /postback?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /other?b=2 HTTP/1.1 junk\r\nHost: x\r\n\r\n",
        )
    assert [(b.method, b.target) for b in seen] == [("GET", "/other?b=2")]


async def test_a_handler_exception_is_a_json_500(caplog):
    async with serve([]) as address:
        status, content_type, body = await exchange(
            address, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert status == 500 and content_type.startswith("application/json")
    assert json.loads(body)["error"] == "internal"
    assert "handler bug" in caplog.text  # logged, with its traceback


def test_request_line_of_the_head():
    assert request_line(b"GET /a?b HTTP/1.1\r\nHost: x\r\n") == ("GET", "/a?b")
    assert request_line(b"\x16\x03\x01\x02") == ("", "")
    assert request_line(b"") == ("", "")
