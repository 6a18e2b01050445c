"""The callbacks service against real publishers (aiohttp servers on 127.0.0.1), a real
broker (Tansu) and, for the attempt log, the sink into the embedded ClickHouse.

Conversions are produced straight to the conversions topic: the worker that makes
them is tested elsewhere."""

import asyncio
import sys
from decimal import Decimal

import pytest

from pipeline import codec
from pipeline.callbacks import app as callbacks_app
from pipeline.callbacks.replay import replay_dead
from pipeline.sink import app as sink_app
from pipeline.sink import migrations as ddl

from .callbacks_support import (
    NO_CLICKHOUSE,
    attempt_outcomes,
    callbacks_config,
    conversion,
    eventually,
    produce_conversions,
    publisher_server,
    publishers_toml,
    read_topic,
    running,
    settings_from,
)

pytestmark = [pytest.mark.kafka]

KINDS = ["ok", "flaky", "busy", "notfound", "redirect", "hang", "slow", "hook"]
# per publisher: the outcome of each attempt, in order (schedule of three retries)
EXPECTED = {
    "ok": ["delivered"],
    "flaky": ["retry", "retry", "delivered"],
    "busy": ["retry", "delivered"],
    "notfound": ["failed"],
    "redirect": ["failed"],
    "hang": ["retry", "retry", "retry", "failed"],
    "slow": ["delivered"],
    "hook": ["delivered"],
}
STATUS = {
    "ok": [200],
    "flaky": [500, 500, 200],
    "busy": [429, 200],
    "notfound": [404],
    "redirect": [302],
    "hang": [None] * 4,
    "slow": [200],
    "hook": [200],
}


@pytest.mark.clickhouse
async def test_each_kind_of_publisher_gets_exactly_the_documented_attempts(tansu, clickhouse_url):
    async with publisher_server(slow_seconds=0.5) as server:
        settings = settings_from(
            callbacks_config(tansu, clickhouse_url, publishers_toml(server.port, KINDS))
        )
        convs = {name: conversion(name) for name in KINDS}
        purchase = conversion(
            "ok",
            "purchase",
            txn_id="order 7",
            revenue=Decimal("9.99"),
            payout=Decimal("1.998"),
            ctit_seconds=None,
        )
        ignored = [
            conversion("ok", "level_up"),  # not an event the publisher subscribes to
            conversion("ok", status="duplicate"),
            conversion("", status="unknown_click"),
            conversion("nobody"),  # publisher not configured
        ]
        sink = sink_app.build(settings)
        async with running(callbacks_app.build(settings)) as service, running(sink):
            await produce_conversions(settings, [*convs.values(), purchase, *ignored])
            total = sum(len(v) for v in EXPECTED.values()) + 1
            client = ddl.connect(settings.clickhouse_url)
            db = settings.clickhouse_database

            def rows():
                return client.query(
                    f"SELECT pub, conversion_id, attempt, outcome, status_code, url, error, "
                    f"duration_ms FROM {db}.callbacks FINAL WHERE outcome != 'sending' "
                    "ORDER BY pub, conversion_id, attempt"
                ).result_rows

            # queried on a thread: the service and the publishers share this event loop
            await eventually(
                lambda: _at_least(asyncio.to_thread(rows), total), 90, 0.5, f"{total} rows"
            )
            dead = await eventually(
                lambda: _at_least(read_topic(settings, "callbacks-dead", codec.CALLBACK_TASK), 3),
                30,
                0.5,
                "3 dead letters",
            )
            # nothing more happens once the schedule is over
            await asyncio.sleep(2)
            table = await asyncio.to_thread(rows)
            metrics = service.metrics.exposition().decode()
            client.close()

    # every publisher saw exactly the documented requests, each with the same key
    for name in KINDS:
        key = convs[name]["conversion_id"]
        seen = [s for s in server.requests[name] if s.query.get("conversion_id", key) == key]
        assert len(seen) == len(EXPECTED[name]), (name, [s.status for s in seen])
        assert [s.headers["Idempotency-Key"] for s in seen] == [key] * len(seen), name
        assert [s.status for s in seen] == STATUS[name], name
    assert len(server.requests["ok"]) == 2  # install and purchase; nothing for the ignored
    assert server.requests["target"] == []  # the redirect was never followed

    # every macro filled, percent-encoded
    ok_requests = {s.query["event"]: s for s in server.requests["ok"]}
    install = ok_requests["install"].query
    c = convs["ok"]
    assert install == {
        "click_id": c["click_id"],
        "conversion_id": c["conversion_id"],
        "campaign_id": "c1",
        "pub": "ok",
        "sub1": "s 1&x",
        "sub2": "",
        "sub3": "",
        "sub4": "",
        "sub5": "five",
        "event": "install",
        "txn_id": "",
        "revenue": "3.00",
        "payout": "2.00",
        "currency": "USD",
        "ctit": "60",
        "click_ts": str(c["click_ts_ms"] // 1000),
        "conversion_ts": str(c["conversion_ts_ms"] // 1000),
        "status": "",  # attributed: empty, as its reason
        "reason": "",
    }
    bought = ok_requests["purchase"].query
    assert (bought["txn_id"], bought["ctit"], bought["payout"]) == ("order 7", "", "1.998")

    # POST: the same fields as JSON, signed, verified by the reference implementation
    hook = server.requests["hook"][0]
    assert hook.signature_ok is True
    assert hook.headers["webhook-id"] == convs["hook"]["conversion_id"]
    assert hook.headers["Content-Type"] == "application/json"

    # the callbacks table explains every attempt
    by_pub: dict[str, list] = {}
    for pub, cid, attempt, outcome, status, url, error, duration in table:
        by_pub.setdefault(pub, []).append((cid, attempt, outcome, status, error, url, duration))
    assert set(by_pub) == set(KINDS)
    for name in KINDS:
        got = [r for r in by_pub[name] if r[0] == convs[name]["conversion_id"]]
        assert [r[1] for r in got] == list(range(1, len(EXPECTED[name]) + 1)), name
        assert [r[2] for r in got] == EXPECTED[name], name
        assert [r[3] for r in got] == STATUS[name], name
        for _, _, outcome, _, error, url, duration in got:
            assert (error == "") == (outcome == "delivered"), (name, error)
            assert url.startswith(f"http://127.0.0.1:{server.port}/{name}")
            assert duration >= 0
    assert len(by_pub["ok"]) == 2
    assert "timeout after 2s" in by_pub["hang"][0][4]
    assert "gave up after 3 retries" in by_pub["hang"][-1][4]
    assert "redirects are not followed" in by_pub["redirect"][0][4]
    assert "HTTP 404" in by_pub["notfound"][0][4]
    assert "HTTP 429" in by_pub["busy"][0][4]
    assert by_pub["hook"][0][5] == f"http://127.0.0.1:{server.port}/hook"

    # the dead-letter topic holds exactly the callbacks that failed for good
    assert sorted(d["pub"] for d in dead) == ["hang", "notfound", "redirect"]
    hang = next(d for d in dead if d["pub"] == "hang")
    assert (hang["attempt"], hang["retry"], hang["last_outcome"]) == (5, 3, "failed")
    assert 'pipeline_callbacks_attempts_total{outcome="delivered",pub="flaky"} 1.0' in metrics
    assert 'pipeline_callbacks_attempts_total{outcome="retry",pub="hang"} 3.0' in metrics
    assert 'pipeline_callbacks_attempts_total{outcome="failed",pub="notfound"} 1.0' in metrics


async def _at_least(rows_coro, n):
    rows = await rows_coro
    return rows if len(rows) >= n else None


async def test_blocked_addresses_never_receive_a_request(tansu):
    async with publisher_server() as server:
        pubs = (
            publishers_toml(server.port, ["ok"])
            + "\n"
            + publishers_toml(server.port, ["flaky"], host="localhost")
        )
        settings = settings_from(
            callbacks_config(tansu, NO_CLICKHOUSE, pubs, allow_private_networks="false")
        )
        convs = [conversion("ok"), conversion("flaky")]
        async with running(callbacks_app.build(settings)):
            await produce_conversions(settings, convs)
            attempts = await eventually(
                lambda: _at_least(attempt_outcomes(settings), 2),
                60,
                0.3,
                "2 attempt records",
            )
            dead = await eventually(
                lambda: _at_least(read_topic(settings, "callbacks-dead", codec.CALLBACK_TASK), 2),
                30,
                0.3,
                "2 dead letters",
            )
            await asyncio.sleep(1)  # a retry would have happened by now (schedule 200ms)
            attempts = await attempt_outcomes(settings)
    assert dict(server.requests) == {}  # not one request reached the server
    by_pub = {a["pub"]: a for a in attempts}
    assert len(attempts) == 2  # blocked is final: no retry
    assert by_pub["ok"]["outcome"] == "blocked" and by_pub["ok"]["status_code"] is None
    assert by_pub["ok"]["error"] == "127.0.0.1 is a loopback address"
    assert by_pub["flaky"]["outcome"] == "blocked"
    assert by_pub["flaky"]["error"].startswith("localhost: ")
    assert sorted(d["last_outcome"] for d in dead) == ["blocked", "blocked"]


async def test_a_slow_offset_commit_holds_up_no_callback(tansu):
    """The periodic commit runs beside the reads: while the broker takes its time
    to answer one, conversions are still read and called back, and the commit
    lands once it answers."""
    async with publisher_server() as server:
        settings = settings_from(
            callbacks_config(tansu, NO_CLICKHOUSE, publishers_toml(server.port, ["ok"]))
        )
        service = callbacks_app.build(settings)
        async with running(service):
            first = [conversion("ok") for _ in range(4)]
            await produce_conversions(settings, first)
            await eventually(lambda: len(server.delivered("ok")) == 4, 60, 0.1, "4 delivered")
            commit, started, answer = service.consumer.commit, asyncio.Event(), asyncio.Event()

            async def slow_commit(offsets=None):
                started.set()
                await answer.wait()
                await commit(offsets)

            service.consumer.commit = slow_commit
            trigger = [conversion("ok")]
            later = [conversion("ok") for _ in range(4)]
            try:
                await produce_conversions(settings, trigger)
                await asyncio.wait_for(started.wait(), 30)  # its commit waits
                await produce_conversions(settings, later)
                await eventually(
                    lambda: len(server.delivered("ok")) == 9, 60, 0.1, "9 delivered, commit waiting"
                )
                assert not service.committing.done()
            finally:
                answer.set()
            await eventually(
                lambda: sum(t.committed or 0 for t in service.trackers.values()) == 9,
                30,
                0.1,
                "the offsets of all 9 committed",
            )
    assert server.delivered("ok") == {c["conversion_id"] for c in first + trigger + later}


async def test_a_stalled_publisher_does_not_delay_a_healthy_one(tansu):
    async with publisher_server() as server:
        settings = settings_from(
            callbacks_config(
                tansu,
                NO_CLICKHOUSE,
                publishers_toml(server.port, ["stall", "ok"]),
                timeout='"120s"',
            )
        )
        stalled = [conversion("stall") for _ in range(12)]
        healthy = [conversion("ok") for _ in range(6)]
        service = callbacks_app.build(settings, concurrency=2, pending=4)
        async with running(service):
            # the stalled publisher's callbacks come first, on every partition
            await produce_conversions(settings, stalled)
            await eventually(
                lambda: server.in_progress["stall"] == 2, 60, 0.1, "two stalled requests"
            )
            await produce_conversions(settings, healthy)
            await eventually(
                lambda: len(server.delivered("ok")) == 6, 60, 0.1, "healthy callbacks delivered"
            )
            # ...all while the stalled publisher still holds its requests
            assert not server.release.is_set() and server.in_progress["stall"] == 2
            assert service.lanes["pub", "stall"].pending <= 4  # the rest wait in Kafka, not here
            deferred = service.metrics.deferred.labels("stall")._value.get()
            assert deferred >= 1
            server.release.set()
            await eventually(
                lambda: len(server.delivered("stall")) == 12,
                60,
                0.2,
                "stalled callbacks delivered once released",
            )
    assert server.max_in_progress["stall"] == 2  # per-publisher concurrency held
    assert server.delivered("ok") == {c["conversion_id"] for c in healthy}
    assert server.delivered("stall") == {c["conversion_id"] for c in stalled}


async def test_dead_letters_replay_after_the_publisher_is_fixed(tansu, tmp_path):
    async with publisher_server() as server:
        text = callbacks_config(tansu, NO_CLICKHOUSE, publishers_toml(server.port, ["fixable"]))
        settings = settings_from(text)
        convs = [conversion("fixable"), conversion("fixable", "purchase", txn_id="t-1")]
        async with running(callbacks_app.build(settings)):
            await produce_conversions(settings, convs)
            await eventually(
                lambda: _at_least(read_topic(settings, "callbacks-dead", codec.CALLBACK_TASK), 2),
                60,
                0.3,
                "2 dead letters",
            )
            server.fixed = True
            assert (
                await replay_dead(
                    settings, callbacks_app.topics(settings), callbacks_app.REPLAY_GROUP
                )
                == 2
            )
            # the command an operator runs: nothing left to replay, each letter goes once
            path = tmp_path / "replay.toml"
            path.write_text(text)
            replay = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pipeline",
                "callbacks-replay",
                "--config",
                str(path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output = (await replay.communicate())[0].decode()
            assert replay.returncode == 0 and "replayed 0 dead-lettered callbacks" in output, output
            await eventually(
                lambda: len(server.delivered("fixable")) == 2,
                60,
                0.2,
                "replayed callbacks delivered",
            )
            attempts = await eventually(
                lambda: _at_least(attempt_outcomes(settings), 4),
                30,
                0.3,
                "4 attempt records",
            )
    got = sorted((a["conversion_id"], a["attempt"], a["outcome"]) for a in attempts)
    ids = sorted(c["conversion_id"] for c in convs)
    # attempt numbers go on across the replay, so the first attempt's row is kept
    assert got == [
        (ids[0], 1, "failed"),
        (ids[0], 2, "delivered"),
        (ids[1], 1, "failed"),
        (ids[1], 2, "delivered"),
    ]
    assert sorted(s.status for s in server.requests["fixable"]) == [200, 200, 404, 404]
    for seen in server.requests["fixable"]:
        assert seen.headers["Idempotency-Key"] == seen.query["conversion_id"]
