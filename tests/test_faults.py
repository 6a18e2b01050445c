"""Faults under load, on Apache Kafka: every component of the pipeline runs as its
own process (ingress, worker, sink, callbacks) against the reference broker and
the embedded ClickHouse, with a loopback publisher; while clicks and postbacks
arrive, each component is killed with SIGKILL several times and restarted, and
the broker is restarted once (its log on disk). Then: no postback lost (every
accepted postback_id has its row and its conversion), no duplicate row under
FINAL, every attributed conversion's callback delivered, every request the
publisher received an attempt row; the duplicate-delivery rate is printed."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from pipeline.dev.kafka import free_port, wait_for_port
from pipeline.sink import migrations as ddl

from .conftest import config_text, wait_until, without_skan
from .stack import start_component

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

COMPONENTS = ("sink", "worker", "callbacks", "ingress")
# (seconds into the load, what): each component killed 3 times, the broker restarted once
PLAN = [
    (4, "callbacks"), (8, "sink"), (12, "worker"), (16, "ingress"),
    (22, "broker"),
    (34, "callbacks"), (38, "worker"), (42, "sink"), (46, "ingress"),
    (54, "callbacks"), (58, "ingress"), (62, "sink"), (66, "worker"),
]  # fmt: skip
LOAD_SECONDS = 72
CONCURRENCY = 3


class Publisher:
    """A loopback publisher: 200 to every callback, counted by conversion."""

    def __init__(self):
        self.received: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        self.received[request.headers["Idempotency-Key"]] += 1
        return web.Response(text="ok")


class Stack:
    def __init__(self, path, tmp_path, ports):
        self.path, self.tmp, self.ports = path, tmp_path, ports
        self.procs = {}
        self.kills: Counter[str] = Counter()

    def start(self, name: str) -> None:
        self.procs[name] = start_component(name, self.path, self.tmp / f"{name}.log")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        assert proc.poll() is None, f"{name} exited by itself: {self.log(name)[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.kills[name] += 1
        self.start(name)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except Exception:  # noqa: BLE001 - stopping: kill what does not stop
                proc.kill()


async def load(
    base: str, until: float, accepted: list[str], clicks: set[str], answers: Counter
) -> None:
    """Clicks and their install postbacks until `until`; a postback is retried (as an
    advertiser does) until it is accepted, across restarts and 503s."""
    async with aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=20)) as http:
        while time.monotonic() < until:
            click_id = None
            while click_id is None and time.monotonic() < until + 60:
                try:
                    async with http.get(
                        "/click/c1", params={"pub": "ok"}, headers={"Accept": "application/json"}
                    ) as r:
                        answers[f"click {r.status}"] += 1
                        if r.status == 200:
                            click_id = (await r.json())["click_id"]
                except (aiohttp.ClientError, TimeoutError):
                    answers["click connection"] += 1
                if click_id is None:
                    await asyncio.sleep(0.3)
            while click_id is not None and time.monotonic() < until + 120:
                try:
                    async with http.post(
                        "/postback",
                        data={"token": "adv-secret", "click_id": click_id, "event": "install"},
                    ) as r:
                        answers[f"postback {r.status}"] += 1
                        if r.status == 200:
                            accepted.append((await r.json())["postback_id"])
                            clicks.add(click_id)
                            break
                except (aiohttp.ClientError, TimeoutError):
                    answers["postback connection"] += 1
                await asyncio.sleep(0.3)


@pytest.fixture
def apache(apache_kafka_broker):
    return apache_kafka_broker


async def test_kills_and_a_broker_restart_lose_nothing(apache, clickhouse_url, tmp_path):
    publisher = Publisher()
    app = web.Application()
    app.router.add_get("/{name}", publisher.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    pub_port = runner.addresses[0][1]
    ingress_port = free_port()
    text = config_text(
        apache.bootstrap_servers,
        clickhouse_url,
        ingress=f'listen = "127.0.0.1:{ingress_port}"\nspool_dir = "{tmp_path / "spool"}"',
        worker=f'web_listen = "127.0.0.1:{free_port()}"\ndata_dir = "{tmp_path / "worker"}"',
        callbacks='timeout = "3s"\nretry_schedule = ["1s", "2s", "4s"]\n'
        "allow_private_networks = true",
    )
    text = re.sub(r"^\[\[publishers\]\]\n(?:[^\[\n].*\n|\n)*", "", without_skan(text), flags=re.M)
    text += (
        f'\n[[publishers]]\nid = "ok"\npostback_url = "http://127.0.0.1:{pub_port}/ok'
        '?c={conversion_id}"\nevents = ["install"]\n'
    )
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    db = re.search(r'database = "(\w+)"', text).group(1)
    subprocess_migrate = start_component("migrate", path, tmp_path / "migrate.log")
    assert await asyncio.to_thread(subprocess_migrate.wait, 120) == 0
    stack = Stack(path, tmp_path, {})
    accepted: list[str] = []
    clicks: set[str] = set()  # those with an accepted install postback
    answers: Counter[str] = Counter()
    try:
        for name in COMPONENTS:
            stack.start(name)
        await asyncio.to_thread(
            wait_for_port, "127.0.0.1", ingress_port, 60, stack.procs["ingress"]
        )
        started = time.monotonic()
        until = started + LOAD_SECONDS
        base = f"http://127.0.0.1:{ingress_port}"
        loaders = [
            asyncio.create_task(load(base, until, accepted, clicks, answers))
            for _ in range(CONCURRENCY)
        ]
        for at, name in PLAN:
            await asyncio.sleep(max(0, started + at - time.monotonic()))
            if name == "broker":
                await asyncio.to_thread(apache.stop)
                await asyncio.to_thread(apache.start)
            else:
                await asyncio.to_thread(stack.kill, name)
        await asyncio.gather(*loaders)
        assert len(accepted) > 100, answers
        ch = ddl.connect(clickhouse_url)

        def attributed() -> list[str]:
            return [
                r[0]
                for r in ch.query(
                    f"SELECT conversion_id FROM {db}.conversions FINAL WHERE status = 'attributed'"
                ).result_rows
            ]

        def settled():
            pb = ch.command(f"SELECT count() FROM {db}.postbacks FINAL WHERE outcome = 'accepted'")
            done = attributed()
            called = all(publisher.received[c] for c in done)
            return (pb >= len(accepted) and len(done) >= len(clicks) and called) or None

        await asyncio.to_thread(wait_until, settled, 300, 1.0, "every postback through")
        await asyncio.sleep(3)  # the last attempt records reach the table
        for name in COMPONENTS:
            assert stack.procs[name].poll() is None, f"{name}: {stack.log(name)[-3000:]}"
        rows = {
            table: ch.query(
                f"SELECT {key}, count() FROM {db}.{table} FINAL GROUP BY {key} HAVING count() > 1"
            ).result_rows
            for table, key in (
                ("clicks", "click_id"),
                ("postbacks", "postback_id"),
                ("conversions", "conversion_id"),
                ("callbacks", "attempt_id"),
            )
        }
        stored = dict(
            ch.query(f"SELECT postback_id, outcome FROM {db}.postbacks FINAL").result_rows
        )
        statuses = dict(
            ch.query(f"SELECT conversion_id, status FROM {db}.conversions FINAL").result_rows
        )
        by_click = Counter(
            r[0]
            for r in ch.query(
                f"SELECT click_id FROM {db}.conversions FINAL WHERE status = 'attributed'"
            ).result_rows
        )
        called_back = attributed()
        attempts = Counter(
            r[0]
            for r in ch.query(
                f"SELECT conversion_id FROM {db}.callbacks FINAL WHERE attempt_id != ''"
            ).result_rows
        )
        ch.close()
    finally:
        stack.stop()
        await runner.cleanup()
    assert rows == {t: [] for t in rows}, rows  # no duplicate row under FINAL
    # the conversion ID is the postback ID: each accepted postback has its row and conversion
    lost = [p for p in accepted if stored.get(p) != "accepted" or p not in statuses]
    assert lost == []
    # one attributed install a click: a postback Kafka took whose answer a kill cut off
    # is accepted all the same, and the advertiser's retry is then its duplicate
    assert {c: by_click[c] for c in clicks if by_click[c] != 1} == {}
    assert Counter(statuses[p] for p in accepted).keys() <= {"attributed", "duplicate"}
    assert [c for c in called_back if not publisher.received[c]] == []
    without_row = {c: n for c, n in publisher.received.items() if attempts[c] < n}
    assert without_row == {}
    duplicated = sum(1 for n in publisher.received.values() if n > 1)
    report = {
        "accepted_postbacks": len(accepted),
        "answers": dict(answers),
        "kills": dict(stack.kills),
        "broker_restarts": 1,
        "callbacks_requests": sum(publisher.received.values()),
        "conversions_delivered_more_than_once": duplicated,
        "attributed_conversions": len(called_back),
        "duplicate_delivery_rate": round(duplicated / len(called_back), 4),
    }
    print(json.dumps(report))
    (tmp_path / "faults.json").write_text(json.dumps(report, indent=1))
