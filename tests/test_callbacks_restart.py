"""`pipeline callbacks` as a process, killed with SIGKILL while retries are pending:
restarted, it resumes the schedule from Kafka and delivers every callback."""

import asyncio
import signal
import subprocess
import sys

import aiohttp
import pytest

from pipeline import config
from pipeline.dev.kafka import die_with_parent, free_port

from .callbacks_support import (
    NO_CLICKHOUSE,
    callbacks_config,
    conversion,
    eventually,
    produce_conversions,
    publisher_server,
    publishers_toml,
)

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


def start(path, log_path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "callbacks", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )


async def test_killed_with_retries_pending_loses_nothing(tansu, tmp_path):
    metrics_port = free_port()
    async with publisher_server() as server:
        path = tmp_path / "callbacks.toml"
        path.write_text(
            callbacks_config(
                tansu,
                NO_CLICKHOUSE,
                publishers_toml(server.port, ["flaky", "ok"]),
                retry_schedule='["1s", "1s", "1s"]',
                metrics_listen=f'"127.0.0.1:{metrics_port}"',
            )
        )
        settings = config.load(path)
        log = tmp_path / "callbacks.log"
        flaky = [conversion("flaky") for _ in range(12)]
        later = [conversion("ok") for _ in range(4)]
        proc = start(path, log)
        try:
            await produce_conversions(settings, flaky)
            # every callback failed its first attempt (500): each has a retry waiting in Kafka
            await eventually(
                lambda: len(set(server.keys("flaky"))) == 12,
                90,
                0.05,
                "a first attempt of every callback",
            )
            proc.send_signal(signal.SIGKILL)  # no chance to commit or finish anything
            proc.wait()
            assert len(server.delivered("flaky")) < 12, "nothing was pending at the kill"
            await produce_conversions(settings, later)  # arrive while nobody runs
            proc = start(path, log)
            await eventually(
                lambda: len(server.delivered("flaky")) == 12,
                120,
                0.2,
                "every flaky callback delivered after the restart",
            )
            await eventually(
                lambda: len(server.delivered("ok")) == 4,
                60,
                0.2,
                "callbacks of conversions made while it was down",
            )
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    metrics = await r.text()
        finally:
            proc.terminate()
            # in a thread: the publishers in this loop keep answering while it stops
            await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert server.delivered("flaky") == {c["conversion_id"] for c in flaky}
    assert server.delivered("ok") == {c["conversion_id"] for c in later}
    for name in ("flaky", "ok"):
        for seen in server.requests[name]:
            # the same Idempotency-Key on every attempt, before and after the restart
            assert seen.headers["Idempotency-Key"] == seen.query["conversion_id"]
    for c in flaky:
        statuses = [
            s.status
            for s in server.requests["flaky"]
            if s.query["conversion_id"] == c["conversion_id"]
        ]
        # at-least-once: an attempt in flight at the kill may be made again, never skipped
        assert statuses[:2] == [500, 500] and statuses[2:] and set(statuses[2:]) == {200}
    # the restarted process counts its attempts on its /metrics endpoint
    assert 'pipeline_callbacks_attempts_total{outcome="delivered",pub="ok"} 4.0' in metrics
    assert 'pipeline_callbacks_attempts_total{outcome="delivered",pub="flaky"}' in metrics
