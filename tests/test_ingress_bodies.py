"""Bodies and headers a careful client never sends, over a raw socket: split and
slow bodies are read whole, and what cannot be parsed or stored is a JSON 4xx
and a row in `postbacks`, never a 500 or a lost request."""

import asyncio
import json
from decimal import Decimal

import pytest
from aiohttp.test_utils import TestServer

from pipeline.ingress.app import build_app
from pipeline.sink import migrations as ddl

from .conftest import make_settings
from .stack import rows_eventually, sink

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def settings(tansu, clickhouse_url):
    return make_settings(tansu, clickhouse_url)


@pytest.fixture
async def server(settings):
    server = TestServer(build_app(settings), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def exchange(server, head: bytes, parts: list[bytes], pause: float = 0.3):
    """Send `head` then each part after `pause`; return (status, JSON body)."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head)
        await writer.drain()
        for part in parts:
            await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        assert headers["content-type"].startswith("application/json"), headers
        return int(status_line.split()[1]), json.loads(body)
    finally:
        writer.close()


def post(body: bytes, content_type: str, extra: bytes = b"") -> bytes:
    head = (
        f"POST /postback HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode()
    return head + extra + b"\r\n"


async def a_click(server) -> str:
    status, body = await exchange(
        server,
        b"GET /click/c1?pub=net1 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
        b"Connection: close\r\n\r\n",
        [],
    )
    assert status == 200
    return body["click_id"]


async def test_a_body_split_in_two_segments_is_read_whole(settings, server):
    db = settings.clickhouse_database
    click_id = await a_click(server)
    form = f"token=adv-secret&click_id={click_id}&event=purchase&txn_id=split-1&revenue=1"
    rest = b"999.99&currency=EUR"
    status, body = await exchange(
        server,
        post(form.encode() + rest, "application/x-www-form-urlencoded"),
        [form.encode(), rest],
    )
    assert (status, body["status"]) == (200, "accepted")
    doc = json.dumps(
        {
            "token": "adv-secret",
            "click_id": click_id,
            "event": "purchase",
            "txn_id": "split-2",
            "revenue": 25.5,
        }
    ).encode()
    status, body = await exchange(
        server, post(doc, "application/json"), [doc[:20], doc[20:40], doc[40:]], pause=0.2
    )
    assert (status, body["status"]) == (200, "accepted")
    chunked = (
        b"POST /postback HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
        b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    tail = f"click_id={click_id}&event=purchase&txn_id=split-3&revenue=7.25".encode()
    status, body = await exchange(
        server,
        chunked,
        [b"11\r\ntoken=adv-secret&\r\n", b"%x\r\n%s\r\n" % (len(tail), tail), b"0\r\n\r\n"],
    )
    assert (status, body["status"]) == (200, "accepted")
    async with sink(settings):
        ch = ddl.connect(settings.clickhouse_url)
        rows = await rows_eventually(
            ch,
            f"SELECT txn_id, revenue, currency FROM {db}.postbacks FINAL "
            "WHERE outcome = 'accepted' ORDER BY txn_id",
            3,
        )
        ch.close()
    assert rows == [
        ("split-1", Decimal("1999.99"), "EUR"),
        ("split-2", Decimal("25.5"), None),
        ("split-3", Decimal("7.25"), None),
    ]


async def test_unstorable_and_unparsable_input_is_a_4xx_and_a_row(settings, server):
    db = settings.clickhouse_database
    click_id = await a_click(server)
    surrogate = (
        f'{{"token": "adv-secret", "click_id": "{click_id}", "event": "install", '
        '"txn_id": "a\\ud800b"}'
    ).encode()
    deep = b'{"token": "adv-secret", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    assert len(deep) < 64 * 1024
    forwarded = f"token=adv-secret&click_id={click_id}&event=install&txn_id=xff".encode()
    cases = [
        (post(surrogate, "application/json"), [surrogate], 400, "invalid_param"),
        (post(deep, "application/json"), [deep], 400, "invalid_param"),
        (
            post(
                forwarded,
                "application/x-www-form-urlencoded",
                b"X-Forwarded-For: 10.0.0.\xff\xfe, 127.0.0.1\r\n",  # not UTF-8
            ),
            [forwarded],
            200,
            None,
        ),
    ]
    for head, parts, status, code in cases:
        got_status, got = await exchange(server, head, parts, pause=0)
        assert got_status == status, got
        if code:
            assert got["error"] == code, got
    async with sink(settings):
        ch = ddl.connect(settings.clickhouse_url)
        rows = await rows_eventually(
            ch, f"SELECT outcome, detail, source_ip, raw FROM {db}.postbacks FINAL", 3
        )
        ch.close()
    outcomes = sorted((r[0], r[1]) for r in rows)
    assert outcomes == [
        ("accepted", ""),
        ("invalid_param", "body is not valid JSON"),
        ("invalid_param", "txn_id is not valid UTF-8"),
    ]
    accepted = next(r for r in rows if r[0] == "accepted")
    assert accepted[2] == "127.0.0.1"  # the malformed hop is not believed
    assert all("adv-secret" not in r[3] for r in rows)
