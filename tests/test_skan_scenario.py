"""SKAdNetwork end to end: real Apple-signed postbacks of several versions and ad
networks, genuine, tampered, resent and forged, plus our own signed with the test
keys, POSTed to a running ingress; the worker and the callbacks service run as
their own processes on Tansu, the sink writes ClickHouse, and a loopback receiver
plays the advertiser. Every outcome and decoded value is read back from
`skan_postbacks`; the receiver gets exactly the verified postbacks of its apps,
byte for byte, signed, through a retry; every attempt is a row in `callbacks`.

Apple's postbacks are those of tests/test_skan_core.py. Apple's documentation
("Registering an ad network") gives the ad network ID as a lowercase identifier in
the format "example123.skadnetwork", so the check stays: the examples that carry
"com.example" (4.0 fine and coarse, 2.2, 2.1) can only be `wrong_ad_network` here,
and our own signed postbacks stand in for those versions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections import defaultdict
from decimal import Decimal

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from standardwebhooks import Webhook

from pipeline import config
from pipeline.core import skan
from pipeline.dev.kafka import free_port
from pipeline.sink import migrations as ddl

from .conftest import config_text, without_skan
from .stack import ingress, rows_eventually, sink, start_component, stop_component
from .test_skan_core import (
    APPLE_V2_1,
    APPLE_V2_2,
    APPLE_V3_LOSS,
    APPLE_V3_WIN,
    APPLE_V4_COARSE,
    APPLE_V4_FINE,
    DEVICE_V1_0,
    DEVICE_V2_0,
    TEST_KEYS,
)
from .test_skan_core import sign as signed
from .test_skan_warehouse import ANALYST_QUERY

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PATH = "/.well-known/skadnetwork/report-attribution/"
SKAN = f"""
[skan]
ad_network_ids = ["example123.skadnetwork", "su67r6k2v3.skadnetwork", "v9wttpbfk9.skadnetwork"]
test_keys = {{ p256 = "{TEST_KEYS["p256"]}", p192 = "{TEST_KEYS["p192"]}" }}

[[skan.sources]]        # campaign-id of Apple's 3.0 examples
id = "42"
campaign = "c1"
pub = "net2"
[[skan.sources]]        # the 1.0 device postback
id = "51"
campaign = "c2"
pub = "net1"
[[skan.sources]]        # the 2.0 device postback
id = "75"
campaign = "c1"
pub = "net1"
[[skan.sources]]        # our own 4.0 postbacks: source-identifier 12xx
id = "12"
campaign = "c2"
pub = "net2"
[[skan.sources]]        # the rival's campaign: verified, never forwarded to acme
id = "77"
campaign = "r1"
pub = "net1"

[skan.apps."525463029"]
fine = [ {{ values = "0", event = "install" }},
         {{ values = "20", event = "trial", revenue = 1.5 }} ]
[skan.apps."1176027022"]
currency = "EUR"
fine = [ {{ values = "18", event = "level_up", revenue = 2 }} ]
[skan.apps."123456789"]
currency = "GBP"
fine = [ {{ values = "0", event = "install" }},
         {{ values = "1-63", event = "purchase", revenue = 4.99 }} ]
coarse = {{ low = "install", medium = "purchase", high = {{ event = "purchase", revenue = 9.99 }} }}
"""
RIVAL = """
[[advertisers]]
id = "rival"
token = "rival-token"

[[campaigns]]
id = "r1"
advertiser = "rival"
destination = "https://rival.example/app?c={click_id}"
"""


def _attacker(curve: ec.EllipticCurve) -> str:
    """A key Apple never heard of, as base64 PKCS#8."""
    der = ec.generate_private_key(curve).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return base64.b64encode(der).decode()


def own_v4(txn: str, **fields) -> dict:
    postback = {
        "version": "4.0",
        "ad-network-id": "example123.skadnetwork",
        "source-identifier": "1234",
        "app-id": 123456789,
        "transaction-id": txn,
        "redownload": False,
        "source-app-id": 1234567891,
        "fidelity-type": 1,
        "did-win": True,
        "postback-sequence-index": 0,
        **fields,
    }
    return signed(postback)  # with the test p256 key the config names


def body(postback: dict) -> bytes:
    return json.dumps(postback).encode()


D = Decimal
FORWARD = "forwarded"
# name -> (body, HTTP status, outcome, (event, revenue, revenue_reporting, currency,
# campaign_id, pub) for verified ones, forwarded?), in the order they are sent
TXN = str(uuid.uuid4())
CASES: dict[str, tuple] = {
    # a forgery with the real transaction-id of a genuine postback, sent before it
    "1.0 forged first": (body(skan.sign(DEVICE_V1_0, _attacker(ec.SECP192R1()))), 200,
                         "invalid_signature", None, False),
    "1.0 Apple's": (body(DEVICE_V1_0), 200, "verified",
                    ("install", D(0), D(0), "EUR", "c2", "net1"), FORWARD),
    "2.0 Apple's": (body(DEVICE_V2_0), 200, "verified",
                    ("level_up", D(2), D("2.16"), "EUR", "c1", "net1"), FORWARD),
    "2.0 tampered campaign-id": (body({**DEVICE_V2_0, "campaign-id": 51}), 200,
                                 "invalid_signature", None, False),
    "3.0 Apple's winner": (body(APPLE_V3_WIN), 200, "verified",
                           ("trial", D("1.5"), D("1.5"), "USD", "c1", "net2"), FORWARD),
    "3.0 winner resent": (body(APPLE_V3_WIN), 200, "duplicate", None, False),
    # conversion values are not signed: Apple's signature holds, the dedup catches it
    "3.0 winner, value changed": (body({**APPLE_V3_WIN, "conversion-value": 0}), 200,
                                  "duplicate", None, False),
    "3.0 winner, transaction-id changed": (
        body({**APPLE_V3_WIN, "transaction-id": "6aafb7a5-0170-41b5-bbe4-fe71dedf1e29"}),
        200, "invalid_signature", None, False),
    "3.0 Apple's loser": (body(APPLE_V3_LOSS), 200, "verified",
                          ("", D(0), D(0), "USD", "c1", "net2"), FORWARD),
    "4.0 Apple's fine (com.example)": (body(APPLE_V4_FINE), 200, "wrong_ad_network", None,
                                       False),
    "4.0 Apple's coarse (com.example)": (body(APPLE_V4_COARSE), 200, "wrong_ad_network",
                                         None, False),
    "2.2 Apple's (com.example)": (body(APPLE_V2_2), 200, "wrong_ad_network", None, False),
    "2.1 Apple's (com.example)": (body(APPLE_V2_1), 200, "wrong_ad_network", None, False),
    "4.0 forged first": (
        body(skan.sign({**own_v4(TXN)}, _attacker(ec.SECP256R1()))), 200,
        "invalid_signature", None, False),
    "4.0 window 0": (body(own_v4(TXN, **{"conversion-value": 7})), 200, "verified",
                     ("purchase", D("4.99"), D("6.3373"), "GBP", "c2", "net2"), FORWARD),
    "4.0 window 1": (
        body(own_v4(TXN, **{"postback-sequence-index": 1, "coarse-conversion-value": "high"})),
        200, "verified", ("purchase", D("9.99"), D("12.6873"), "GBP", "c2", "net2"), FORWARD),
    "4.0 window 2": (
        body(own_v4(TXN, **{"postback-sequence-index": 2, "coarse-conversion-value": "low"})),
        200, "verified", ("install", D(0), D(0), "GBP", "c2", "net2"), FORWARD),
    "4.0 window 1 resent": (
        body(own_v4(TXN, **{"postback-sequence-index": 1, "coarse-conversion-value": "high"})),
        200, "duplicate", None, False),
    "4.0 unknown source": (body(own_v4(str(uuid.uuid4()), **{"source-identifier": "9999"})),
                           200, "unknown_source", None, False),
    "4.0 rival's app": (body(own_v4(str(uuid.uuid4()), **{"source-identifier": "7712"})),
                        200, "verified", ("install", D(0), D(0), "GBP", "r1", "net1"), False),
    "5.0": (body({**own_v4(str(uuid.uuid4())), "version": "5.0"}), 200,
            "unsupported_version", None, False),
    "not JSON": (b'{"version": "4.0", "ad-network-id":', 400, "invalid_json", None, False),
    "an array": (b"[1, 2]", 400, "invalid_json", None, False),
    "too large": (body({"pad": "x" * 70_000}), 413, "too_large", None, False),
}  # fmt: skip
# the analyst's view of the verified ones: (campaign, pub, postback window, postbacks,
# installs, events, revenue in the reporting currency)
BY_WINDOW = [
    ("c1", "net1", 0, 1, 1, 1, D("2.16")),
    ("c1", "net2", 0, 2, 1, 1, D("1.5")),  # the loser is no install
    ("c2", "net1", 0, 1, 1, 0, D(0)),
    ("c2", "net2", 0, 1, 1, 1, D("6.3373")),
    ("c2", "net2", 1, 1, 0, 1, D("12.6873")),
    ("c2", "net2", 2, 1, 0, 0, D(0)),
    ("r1", "net1", 0, 1, 1, 0, D(0)),
]


@contextlib.asynccontextmanager
async def receiver():
    """The advertiser's server: 503 to the first request of each Idempotency-Key,
    200 after; remembers every request."""
    seen = defaultdict(list)  # path -> [(headers, body, status)]
    keys: dict[str, int] = defaultdict(int)

    async def handle(request: web.Request) -> web.Response:
        data = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        keys[key] += 1
        status = 503 if keys[key] == 1 else 200
        seen[request.path].append((dict(request.headers), data, status))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def scenario_config(tmp_path, bootstrap: str, clickhouse: str, forward_url: str):
    sections = {
        "worker": f'web_listen = "127.0.0.1:{free_port()}"\ntick_interval = "250ms"',
        "callbacks": 'timeout = "2s"\nretry_schedule = ["300ms", "600ms"]\n'
        "allow_private_networks = true",
    }
    text = without_skan(config_text(bootstrap, clickhouse, RIVAL, **sections))
    old = 'skan_forward_url = "http://127.0.0.1:9999/skan"'
    assert old in text
    text = text.replace(old, f'skan_forward_url = "{forward_url}"\nsigning_secret = "{SECRET}"')
    path = tmp_path / "pipeline.toml"
    path.write_text(text + SKAN)
    return path, config.load(path)


async def test_apples_postbacks_end_to_end(tansu, clickhouse_url, tmp_path):
    async with receiver() as (url, seen):
        path, settings = scenario_config(tmp_path, tansu, clickhouse_url, f"{url}/acme")
        db = settings.clickhouse_database
        ch = ddl.connect(clickhouse_url)
        logs = {name: tmp_path / f"{name}.log" for name in ("worker", "callbacks")}
        procs = {name: start_component(name, path, log) for name, log in logs.items()}
        answers: dict[str, tuple[int, dict]] = {}
        try:
            async with ingress(settings) as http, sink(settings):
                for name, (data, *_) in CASES.items():
                    headers = {"Content-Type": "application/json"}
                    async with http.post(PATH, data=data, headers=headers) as r:
                        answers[name] = (r.status, await r.json())
                rows = await rows_eventually(
                    ch, f"SELECT skan_id FROM {db}.skan_postbacks FINAL", len(CASES), 180
                )
                forwards = sum(1 for case in CASES.values() if case[4] == FORWARD)
                # each forward: a 503 first (retried from Kafka), then delivered
                attempts = await rows_eventually(
                    ch,
                    f"SELECT conversion_id, advertiser, pub, attempt, outcome, status_code "
                    f"FROM {db}.callbacks FINAL WHERE advertiser != '' "
                    f"AND outcome = 'delivered'",
                    forwards,
                    120,
                )
                await asyncio.sleep(2)  # nothing more arrives: no late, extra forward
                result = ch.query(f"SELECT * FROM {db}.skan_postbacks FINAL")
                table = [
                    dict(zip(result.column_names, row, strict=True)) for row in result.result_rows
                ]
                attempts = ch.query(
                    f"SELECT conversion_id, advertiser, pub, attempt, outcome, status_code "
                    f"FROM {db}.callbacks FINAL WHERE advertiser != '' "
                    f"ORDER BY conversion_id, attempt"
                ).result_rows
                by_window = ch.query(ANALYST_QUERY.format(db=db)).result_rows
        finally:
            codes = {name: stop_component(proc) for name, proc in procs.items()}
            ch.close()
        for name, code in codes.items():
            assert code == 0, logs[name].read_text()[-3000:]

    assert len(rows) == len(table) == len(CASES)
    by_id = {row["skan_id"]: row for row in table}
    refused = [row for row in table if row["outcome"] in ("invalid_json", "too_large")]
    forwarded_ids = set()
    for name, (data, status, outcome, decoded, forward) in CASES.items():
        got_status, answer = answers[name]
        assert got_status == status, (name, answer)
        if status == 200:
            assert answer["status"] == "received"
            row = by_id[answer["skan_id"]]
        else:
            assert answer["error"] == outcome
            row = next(
                r for r in refused if r["outcome"] == outcome and r["raw"] in (data.decode(), "")
            )
        assert row["outcome"] == outcome, (name, row["detail"])
        assert row["raw"] == ("" if outcome == "too_large" else data.decode()), name
        if decoded is not None:
            got = tuple(row[c] for c in ("event", "revenue", "revenue_reporting", "currency",
                                         "campaign_id", "pub"))  # fmt: skip
            assert got == decoded, name
        else:
            assert (row["event"], row["campaign_id"], row["revenue"]) == ("", "", 0), name
        if status == 200:  # every field Apple sends, in its column
            sent = json.loads(data)
            assert row["transaction_id"] == str(sent.get("transaction-id", ""))
            assert row["ad_network_id"] == sent["ad-network-id"]
            assert row["attribution_signature"] == sent.get("attribution-signature", "")
            assert row["postback_sequence_index"] == sent.get("postback-sequence-index")
            assert row["did_win"] == sent.get("did-win")
            assert row["conversion_value"] == sent.get("conversion-value")
            assert row["coarse_conversion_value"] == sent.get("coarse-conversion-value", "")
            assert row["source_ip"] == "127.0.0.1"
        if forward:
            forwarded_ids.add(row["skan_id"])

    # the receiver got exactly the verified postbacks of acme's apps, verbatim, signed
    assert set(seen) == {"/acme"}
    requests = seen["/acme"]
    assert {h["Idempotency-Key"] for h, _, _ in requests} == forwarded_ids
    bodies = {by_id[h["Idempotency-Key"]]["raw"].encode() for h, _, _ in requests}
    assert {data for data, *_, f in CASES.values() if f} == bodies
    for headers, data, _ in requests:
        assert data == by_id[headers["Idempotency-Key"]]["raw"].encode()
        assert headers["Content-Type"] == "application/json"
        assert headers["webhook-id"] == headers["Idempotency-Key"]
        Webhook(SECRET).verify(data, {k.lower(): v for k, v in headers.items()})
    assert sorted(status for _, _, status in requests) == [200] * len(forwarded_ids) + [503] * len(
        forwarded_ids
    )
    # and every attempt is a row: a retry after the 503, then delivered
    assert sorted(attempts) == sorted(
        row
        for skan_id in forwarded_ids
        for row in (
            (skan_id, "acme", "", 1, "retry", 503),
            (skan_id, "acme", "", 2, "delivered", 200),
        )
    )
    assert by_window == BY_WINDOW


async def test_the_dedup_state_survives_a_killed_worker(tansu, clickhouse_url, tmp_path):
    """Killed without warning after a verified postback: the restarted worker restores
    the table from its changelog, replays what was not committed without a change,
    and still knows the copy that comes next is a duplicate."""
    # no callbacks service runs here: the forward URL is never dialled
    path, settings = scenario_config(tmp_path, tansu, clickhouse_url, "http://127.0.0.1:9/acme")
    db = settings.clickhouse_database
    ch = ddl.connect(clickhouse_url)
    log = tmp_path / "worker.log"
    worker = start_component("worker", path, log)
    sql = f"SELECT skan_id, outcome FROM {db}.skan_postbacks FINAL ORDER BY received_at"
    try:
        async with ingress(settings) as http, sink(settings):

            async def post(data: bytes) -> str:
                async with http.post(PATH, data=data) as r:
                    assert r.status == 200
                    return (await r.json())["skan_id"]

            first = await post(body(APPLE_V3_WIN))
            await rows_eventually(ch, sql, 1, 180)
            worker.kill()
            worker.wait()
            worker = start_component("worker", path, log)
            second = await post(body(APPLE_V3_WIN))
            rows = await rows_eventually(ch, sql, 2, 180)
    finally:
        assert stop_component(worker) == 0, log.read_text()[-3000:]
        ch.close()
    assert rows == [(first, "verified"), (second, "duplicate")]
