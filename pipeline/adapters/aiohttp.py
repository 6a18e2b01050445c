"""aiohttp's connection handler, where the application never sees a request.

A request aiohttp's HTTP parser refuses (a malformed request line, a header
line over the limit, broken chunked framing) never reaches a route: aiohttp
answers it itself with a `text/plain` 400 and logs the raw request line, token
included, at ERROR. An exception in a handler is a `text/plain` 500 the same way.
`Runner` (an `AppRunner`) serves its application with a connection handler that
instead:

- hands every refused request to `on_bad_request(BadRequest)`, whose answer is
  sent (the ingress makes it a JSON 400 and, for /postback, a row), and logs one
  WARNING line without the request's bytes;
- answers a handler's exception with the JSON error body (and logs it at ERROR
  as aiohttp does; the log's secret filter applies).

What this relies on (tests/test_aiohttp_adapter.py pins it): `AppRunner`'s
`_make_server()` returns a `web_server.Server` whose `__call__` builds the
connection's `web_protocol.RequestHandler`; the handler reports a parser error
by calling `_make_error_handler(err_info)`, whose `err_info.exc` is the
parser's exception; handler exceptions go to `handle_error(request, 500, exc)`;
`log_access` runs after each response. The start of a refused request is
known only from the bytes received: the handler keeps the first HEAD_BYTES of
each request (from the end of the previous response), so the request line of a
pipelined request that follows another in the same read may not be the one
named.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import http_exceptions, web, web_protocol, web_server

log = logging.getLogger(__name__)

HEAD_BYTES = 16 * 1024  # the request line (at most 8190 bytes) and the first headers
# a request line: a method without ':' (not a header), a target, whatever follows
_REQUEST_LINE = re.compile(rb"([!-9;-~]{1,32}) ([^ \r\n]+)(?: [^\r\n]*)?(?:\r?\n|$)")

_REASONS: list[tuple[type[BaseException], str]] = [
    (http_exceptions.LineTooLong, "the request line or a header is too long"),
    (http_exceptions.BadHttpMethod, "the request method is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.InvalidURLError, "the request target is malformed"),
    (http_exceptions.InvalidHeader, "a header is malformed"),
    (http_exceptions.PayloadEncodingError, "the body's framing or encoding is malformed"),
]


@dataclass(frozen=True)
class BadRequest:
    """A request the HTTP parser refused, as far as its first bytes tell.

    `method` and `target` come from its request line ('' when none could be
    read); `reason` is a sentence without any of the request's bytes."""

    method: str
    target: str
    remote: str
    status: int
    reason: str


def reason_of(exc: BaseException) -> str:
    """A sentence saying what was wrong, without the request's bytes."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "the request is not valid HTTP/1.1"


def request_line(head: bytes) -> tuple[str, str]:
    """(method, target) of the last request line in `head` that starts a message (at
    the start, or after the blank line ending a message's head); ('', '') when none."""
    starts = [0] + [i + 4 for i in _find_all(head, b"\r\n\r\n")]
    found = None
    for start in reversed(starts):
        found = _REQUEST_LINE.match(head, start)
        if found is not None:
            break
    if found is None:
        return "", ""
    decode = lambda b: b.decode("latin-1")  # noqa: E731 - bytes as they came, shown safely
    return decode(found.group(1)), decode(found.group(2))


def _find_all(data: bytes, sep: bytes) -> list[int]:
    found, at = [], data.find(sep)
    while at != -1:
        found.append(at)
        at = data.find(sep, at + 1)
    return found


OnBadRequest = Callable[[BadRequest], Awaitable[web.StreamResponse]]


def json_error(status: int, code: str, detail: str) -> web.Response:
    response = web.json_response({"error": code, "detail": detail}, status=status)
    response.force_close()
    return response


class _Handler(web_protocol.RequestHandler):
    def __init__(self, manager, *, on_bad_request: OnBadRequest, **kwargs):
        super().__init__(manager, **kwargs)
        self._on_bad_request = on_bad_request
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        super().data_received(data)

    def log_access(self, request, response, time) -> None:
        self._head = b""  # what comes next is the next request
        super().log_access(request, response, time)

    def _make_error_handler(self, err_info):
        head = self._head

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            method, target = request_line(head)
            bad = BadRequest(
                method, target, request.remote or "", err_info.status, reason_of(err_info.exc)
            )
            log.warning(
                "refused a request from %s that is not valid HTTP (%s): %s %s",
                bad.remote,
                type(err_info.exc).__name__,
                bad.method or "?",
                target.split("?", 1)[0][:200] or "?",
            )
            try:
                response = await self._on_bad_request(bad)
            except Exception:  # noqa: BLE001 - the answer must still be sent
                log.exception("answering a refused request failed")
                response = json_error(bad.status, "invalid_request", bad.reason)
            response.force_close()  # the parser's state is lost: no next request here
            return response

        return handler

    def handle_error(self, request, status=500, exc=None, message=None) -> web.StreamResponse:
        if status != 500 or exc is None:
            return super().handle_error(request, status, exc, message)
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        return json_error(500, "internal", "the server failed to answer; retry")


class _Server(web_server.Server):
    on_bad_request: OnBadRequest

    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, on_bad_request=self.on_bad_request, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections answer refused requests with `on_bad_request`
    and handler exceptions with a JSON 500 (see the module docstring)."""

    def __init__(self, app: web.Application, on_bad_request: OnBadRequest, **kwargs):
        super().__init__(app, **kwargs)
        self._on_bad_request = on_bad_request

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        # the same server, building our connection handler (no state is added)
        server.__class__ = _Server
        server.on_bad_request = self._on_bad_request
        return server
