"""Attribution scenarios sent only through the HTTP API and checked only in ClickHouse,
with the worker as its own process: every status, amounts and FX, postbacks before
their clicks, restarts, rebalances and bounded state; on Tansu and on Apache Kafka."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import urllib.request
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaProducer

from pipeline import codec, config, kafka
from pipeline.core import clickid, validation
from pipeline.dev.kafka import free_port
from pipeline.sink import migrations as ddl
from pipeline.worker.app import create_app

from .conftest import config_text, make_settings, wait_until, write_config
from .stack import ingress, rows_eventually, sink, start_component, stop_component

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

RIVAL = """
[[advertisers]]
id = "rival"
token = "rival-token"

[[campaigns]]
id = "short"
advertiser = "acme"
destination = "https://apps.example/short?c={click_id}"
click_window = "2s"
currency = "USD"
[campaigns.events.install]
payout = 1.00
"""


def worker_sections(**extra):
    sections = {
        "attribution": 'unknown_click_grace = "2s"',
        "worker": f'web_listen = "127.0.0.1:{free_port()}"\nstate_margin = "1s"\n'
        'tick_interval = "250ms"',
    }
    sections.update(extra)
    return sections


@pytest.fixture
def ch(clickhouse_url):
    client = ddl.connect(clickhouse_url)
    yield client
    client.close()


async def click(http, campaign="c1", pub="net1", **subs) -> str:
    async with http.get(
        f"/click/{campaign}", params={"pub": pub, **subs}, allow_redirects=False
    ) as r:
        assert r.status == 302, await r.text()
        return r.headers["X-Click-Id"]


async def postback(http, click_id, event="install", token="adv-secret", **params) -> str:
    async with http.post(
        "/postback", data={"token": token, "click_id": click_id, "event": event, **params}
    ) as r:
        body = await r.json()
        assert r.status == 200, body
        return body["postback_id"]


def conversions(ch, db) -> dict[str, dict]:
    result = ch.query(f"SELECT * FROM {db}.conversions FINAL")
    return {row[0]: dict(zip(result.column_names, row, strict=True)) for row in result.result_rows}


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
async def test_every_status_amounts_and_fx(store, tansu, clickhouse_url, ch, tmp_path):
    sections = worker_sections()
    sections["worker"] += f'\nstore = "{store}"\ndata_dir = "{tmp_path / "worker-data"}"'
    path, settings = write_config(tmp_path, tansu, clickhouse_url, RIVAL, **sections)
    db = settings.clickhouse_database
    worker = start_component("worker", path, tmp_path / "worker.log")
    expected: dict[str, tuple] = {}
    try:
        async with ingress(settings) as http, sink(settings):
            old = await click(http, "short")  # clicked now, converts after its 2s window
            c1 = await click(http, "c1", sub1="a b")
            expected[await postback(http, c1)] = ("attributed", "3", "2", "USD", "3", "2")
            expected[await postback(http, c1)] = ("duplicate", "0", "0", "USD", "0", "0")
            first = await postback(
                http, c1, "purchase", txn_id="t-1", revenue="19.99", currency="EUR"
            )
            expected[first] = ("attributed", "19.99", "3.998", "EUR", "21.5892", "4.31784")
            # the first txn_id to reach the dedup stage wins; clicks live on different
            # partitions, so the repeat is sent once the first one is decided
            await rows_eventually(
                ch,
                f"SELECT 1 FROM {db}.conversions FINAL WHERE conversion_id = '{first}'",
                1,
                timeout=90,
            )
            c1b = await click(http, "c1")
            expected[await postback(http, c1b, "purchase", txn_id="t-1", revenue="5")] = (
                "duplicate",
                "5",
                "0",
                "USD",
                "0",
                "0",
            )  # same txn_id on another click
            expected[await postback(http, c1, "signup")] = (
                "unknown_event",
                "0",
                "0",
                "USD",
                "0",
                "0",
            )
            expected[await postback(http, c1, token="rival-token")] = (
                "wrong_advertiser",
                "0",
                "0",
                "USD",
                "0",
                "0",
            )
            c2 = await click(http, "c2", pub="net2")  # an EUR campaign, fixed payout 1.50
            expected[await postback(http, c2)] = ("attributed", "0", "1.5", "EUR", "0", "1.62")
            never = clickid.issue(settings.secrets)  # a real ID whose click never arrives
            expected[await postback(http, never)] = ("unknown_click", "0", "0", "USD", "0", "0")

            # a postback before its click: the click comes late from a lagging ingress
            late_click_id = clickid.issue(settings.secrets)
            expected[
                await postback(http, late_click_id, "purchase", txn_id="t-2", revenue="10")
            ] = ("attributed", "10", "2", "USD", "10", "2")
            await asyncio.sleep(0.5)
            _, late = validation.click_record(settings, "c1", {"pub": "net1"}, "198.51.100.7", "")
            late["click_id"] = late_click_id
            late["ts_ms"] = clickid.verify(late_click_id, settings.secrets)
            producer = AIOKafkaProducer(bootstrap_servers=tansu, acks="all")
            await producer.start()
            await producer.send_and_wait(
                settings.topic("clicks"), codec.CLICK.encode(late), key=late_click_id.encode()
            )
            await producer.stop()

            await asyncio.sleep(max(0.0, 2.5))  # let the short campaign's window pass
            expected[await postback(http, old)] = ("outside_window", "0", "0", "USD", "0", "0")

            await rows_eventually(
                ch, f"SELECT 1 FROM {db}.conversions FINAL", len(expected), timeout=90
            )
            rows = conversions(ch, db)
    finally:
        assert stop_component(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert set(rows) == set(expected)  # one conversion per accepted postback, no more
    for conversion_id, (status, revenue, payout, currency, rev_rep, pay_rep) in expected.items():
        row = rows[conversion_id]
        got = (
            row["status"],
            row["revenue"],
            row["payout"],
            row["currency"],
            row["revenue_reporting"],
            row["payout_reporting"],
        )
        want = (
            status,
            Decimal(revenue),
            Decimal(payout),
            currency,
            Decimal(rev_rep),
            Decimal(pay_rep),
        )
        assert got == want, (conversion_id, row)
    install = next(
        r
        for r in rows.values()
        if r["status"] == "attributed" and r["event"] == "install" and r["campaign_id"] == "c1"
    )
    assert install["ctit_seconds"] is not None and install["sub1"] == "a b"
    assert install["pub"] == "net1" and install["click_ts"] is not None
    stats = ch.query(
        f"SELECT sum(clicks), sum(installs), sum(events), sum(payout_reporting) "
        f"FROM {db}.campaign_stats_hourly WHERE campaign_id = 'c1'"
    ).result_rows
    assert stats == [(3, 1, 2, Decimal("8.31784"))]  # c1, c1b and the late click


def worker_metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
async def test_state_stays_bounded(store, tansu, clickhouse_url, tmp_path):
    """Many clicks past a short window: the live state goes back to (near) zero.
    On RocksDB the expiry index is on disk too, and the gauge counts without a scan."""
    sections = worker_sections()
    sections["worker"] += f'\nstore = "{store}"\ndata_dir = "{tmp_path / "data"}"'
    port = int(re.search(r":(\d+)", sections["worker"]).group(1))
    # state lives for the longest click window (+ grace + margin): make every window
    # short, yet long enough that 300 clicks sent on a loaded machine are live together
    text = re.sub(
        r'click_window = "\w+"',
        'click_window = "5s"',
        config_text(tansu, clickhouse_url, RIVAL, **sections),
    )
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    settings = config.load(path)
    log = tmp_path / "worker.log"
    worker = start_component("worker", path, log)
    gauge = 'pipeline_worker_state_keys{table="state"}'
    try:
        # clicks sent before the worker has its partitions could expire unseen
        await asyncio.to_thread(
            wait_until, lambda: "Worker ready" in log.read_text() or None, 90, 0.2, "worker ready"
        )
        async with ingress(settings) as http:
            ids = [await click(http, "short") for _ in range(300)]
            for click_id in ids[:50]:
                await postback(http, click_id)
            peak = await asyncio.to_thread(
                wait_until,
                lambda: (v := worker_metric(port, gauge)) and v >= 250 and v,
                90,
                0.3,
                "clicks in the worker's state",
            )
            # window 5s + grace 2s + margin 1s: all of it expires within seconds
            await asyncio.to_thread(
                wait_until,
                lambda: worker_metric(port, gauge) == 0 or None,
                60,
                0.5,
                f"state emptied ({gauge} was {worker_metric(port, gauge)})",
            )
    finally:
        assert stop_component(worker) == 0, log.read_text()[-3000:]
    assert peak >= 250


async def send_installs(http, n: int, campaign: str = "c1") -> list[tuple[str, str]]:
    """n clicks, each with an install and a purchase with its own txn_id."""
    out = []
    for _ in range(n):
        click_id = await click(http, campaign)
        out.append((click_id, await postback(http, click_id)))
        out.append(
            (
                click_id,
                await postback(
                    http, click_id, "purchase", revenue="1.25", txn_id=f"txn-{click_id}"
                ),
            )
        )
    return out


async def wait_for_conversions(ch, db, ids, timeout=180):
    ids, missing = set(ids), []

    def done():
        found = {
            r[0] for r in ch.query(f"SELECT conversion_id FROM {db}.conversions FINAL").result_rows
        }
        missing[:] = sorted(ids - found)
        return not missing or None

    try:
        await asyncio.to_thread(wait_until, done, timeout, 0.5, f"{len(ids)} conversions")
    except AssertionError:
        raise AssertionError(
            f"{len(missing)} of {len(ids)} conversions missing: {missing[:5]}"
        ) from None


async def repeat_and_check(http, ch, db, sent, worker_logs):
    """Resend installs and txn_ids of clicks converted before a restart or failover:
    the state that says they were counted must have survived."""
    repeats = []
    for click_id, _ in sent[::2][:20]:
        repeats.append(await postback(http, click_id))
        repeats.append(
            await postback(http, click_id, "purchase", revenue="1.25", txn_id=f"txn-{click_id}")
        )
    originals = [pid for _, pid in sent]
    await wait_for_conversions(ch, db, originals + repeats)
    rows = ch.query(f"SELECT conversion_id, status FROM {db}.conversions FINAL").result_rows
    status = dict(rows)
    assert len(rows) == len(originals) + len(repeats), "one row per accepted postback"
    assert [status[p] for p in originals] == ["attributed"] * len(originals), worker_logs()
    assert [status[p] for p in repeats] == ["duplicate"] * len(repeats), worker_logs()
    raw = ch.query(f"SELECT count(), uniqExact(conversion_id) FROM {db}.conversions").result_rows
    return raw[0]


async def test_worker_killed_mid_stream_restarts_exactly_once(broker, clickhouse_url, ch, tmp_path):
    path, settings = write_config(tmp_path, broker, clickhouse_url, **worker_sections())
    db, log = settings.clickhouse_database, tmp_path / "worker.log"
    worker = start_component("worker", path, log)
    try:
        async with ingress(settings) as http, sink(settings):
            sent = await send_installs(http, 60)
            await rows_eventually(ch, f"SELECT 1 FROM {db}.conversions LIMIT 1", 1, timeout=120)
            flowing = asyncio.create_task(send_installs(http, 60))
            await asyncio.sleep(0.5)
            worker.send_signal(signal.SIGKILL)  # mid-stream: no commit, no flush
            worker.wait()
            sent += await flowing
            worker = start_component("worker", path, log)
            sent += await send_installs(http, 20)
            await repeat_and_check(http, ch, db, sent, log.read_text)
    finally:
        assert stop_component(worker) == 0, log.read_text()[-3000:]


async def test_two_workers_share_partitions_and_fail_over(broker, clickhouse_url, ch, tmp_path):
    sections = worker_sections()
    path, settings = write_config(tmp_path, broker, clickhouse_url, **sections)
    second = tmp_path / "second.toml"
    second.write_text(
        path.read_text().replace(
            re.search(r'web_listen = "[^"]+"', path.read_text()).group(0),
            f'web_listen = "127.0.0.1:{free_port()}"',
        )
    )
    db = settings.clickhouse_database
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [start_component("worker", path, logs[0]), start_component("worker", second, logs[1])]

    def worker_logs():
        return "\n".join(p.read_text()[-2000:] for p in logs)

    try:
        async with ingress(settings) as http, sink(settings):
            sent = await send_installs(http, 60)
            await wait_for_conversions(ch, db, [pid for _, pid in sent])
            workers[0].send_signal(signal.SIGKILL)  # the survivor takes over its partitions
            workers[0].wait()
            sent += await send_installs(http, 40)
            await repeat_and_check(http, ch, db, sent, worker_logs)
        both = "\n".join(p.read_text() for p in logs)
        assert both.count("Worker ready") >= 2, "both workers were assigned partitions"
    finally:
        for w in workers:
            stop_component(w)


async def test_the_kafka_consumer_runs_on_the_workers_loop_and_stops_alone(tansu):
    """Faust runs the worker's aiokafka consumer on a thread and a loop of its own; the
    worker runs it on its own loop (worker.consumer.ConsumerThread). It must start no
    thread, fetch from the broker there, and stop without ending the loop's other tasks."""
    settings = make_settings(tansu, "http://127.0.0.1:1")
    await kafka.ensure_topics(settings, ["clicks"])
    app, _ = create_app(settings)
    bystander = asyncio.create_task(asyncio.sleep(120))
    threads = set(threading.enumerate())
    consumer = app.consumer._thread
    await consumer.start()
    try:
        assert set(threading.enumerate()) == threads, "no thread of its own"
        assert await consumer.call_thread(threading.get_ident) == threading.get_ident()
        aiokafka_consumer = consumer._ensure_consumer()
        assert settings.topic("clicks") in await consumer.call_thread(aiokafka_consumer.topics)
    finally:
        await consumer.stop()
    assert aiokafka_consumer._closed, "its aiokafka consumer was stopped"
    assert not bystander.done(), "the loop's other tasks keep running"
    bystander.cancel()
