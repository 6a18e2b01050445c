"""The ingress as `pipeline ingress` serves it, fed what the hardening probe sends:
JSON as text/plain, tokens under other names, requests aiohttp's parser refuses.
Each is a JSON answer and a row in `postbacks`, and no configured secret is in a
row or a log line."""

import asyncio
import json
import logging

import pytest

from pipeline import logs
from pipeline.core.secrets import Secrets
from pipeline.sink import migrations as ddl

from .conftest import make_settings
from .stack import rows_eventually, serving, sink

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]
TOKEN, CLICK_SECRET = "adv-secret", "dev-secret-change-me"


@pytest.fixture
def settings(tansu, clickhouse_url):
    return make_settings(tansu, clickhouse_url)


async def exchange(address, data: bytes) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    return int(head.split()[1]), json.loads(body)


def post(body: bytes, content_type: str, target: str = "/postback") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def test_what_the_probe_sends_is_a_json_answer_a_row_and_no_secret(settings, capsys):
    db = settings.clickhouse_database
    logs.configure("DEBUG", "text", settings.redaction)
    try:
        async with serving(settings) as address:
            _, click = await exchange(
                address,
                b"GET /click/c1?pub=net1 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
                b"Connection: close\r\n\r\n",
            )
            cid = click["click_id"]
            doc = json.dumps(
                {"token": TOKEN, "click_id": cid, "event": "purchase", "txn_id": "plain-1"}
            )
            cases = [
                # JSON sent as text/plain is read as JSON
                (post(doc.encode(), "text/plain"), 200),
                (post(doc.encode(), "text/plain; charset=utf-8"), 200),
                # a JSON number keeps its text: 1E+2 is not a plain decimal
                (
                    post(
                        f'{{"token": "{TOKEN}", "click_id": "{cid}", "event": "purchase", '
                        '"revenue": 1E+2}'.encode(),
                        "application/json",
                    ),
                    400,
                ),
                (
                    f"GET /postback?token={TOKEN}&click_id={cid}&event=purchase&txn_id=amp-1"
                    f"&amp;token={TOKEN}&Token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
                    "Connection: close\r\n\r\n".encode(),
                    200,
                ),
                # refused by aiohttp's parser: a JSON 400 and a row all the same
                (f"GET /postback?token={TOKEN}&txn_id=bad-1 HTTP/1.1 x\r\n\r\n".encode(), 400),
                (f"GET /postback?token={TOKEN} HTTP/1.1\r\nBad Header\r\n\r\n".encode(), 400),
                (
                    f"GET /postback?token={TOKEN}&x={'a' * 9000} HTTP/1.1\r\n\r\n".encode(),
                    400,
                ),
                (
                    f"POST /postback?token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
                    "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode(),
                    400,
                ),
                # not a postback: a JSON 400, no row
                (f"GET /click/c1?token={TOKEN} HTTP/1.1 x\r\n\r\n".encode(), 400),
            ]
            for data, status in cases:
                got_status, body = await exchange(address, data)
                assert got_status == status, (data[:80], body)
                assert TOKEN not in json.dumps(body)
        async with sink(settings):
            ch = ddl.connect(settings.clickhouse_url)
            rows = await rows_eventually(
                ch,
                f"SELECT outcome, detail, click_id, txn_id, raw FROM {db}.postbacks FINAL",
                8,
            )
            ch.close()
        logging.getLogger("aiohttp.server").info("flush")
    finally:
        logs.configure("INFO", "text", Secrets())
    err = capsys.readouterr().err
    assert len(rows) == 8, rows
    outcomes = sorted(r[0] for r in rows)
    assert outcomes == ["accepted"] * 3 + ["invalid_param"] + ["invalid_request"] * 4
    stored = json.dumps(rows, default=str)
    assert TOKEN not in stored and CLICK_SECRET not in stored
    assert TOKEN not in err and CLICK_SECRET not in err
    assert not [line for line in err.splitlines() if " ERROR " in line], err
    refused = [json.loads(r[4]) for r in rows if r[0] == "invalid_request"]
    assert all(r["path"] == "/postback" and r["params"]["token"] == "***" for r in refused)
