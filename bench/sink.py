"""Sink figure: rows per second one `pipeline sink` process writes into
ClickHouse, against clickhouse-connect inserting the same rows in one call
per table to the same server (the embedded ClickHouse; a fresh database,
same DDL).

The topics hold clicks and postbacks (10:1) before the sink starts. The sink's
rate is taken between the first rows appearing and the last (count() polled
every 0.1 s), so start-up and migrations are not counted; the sink's batch
settings are those of deploy/example.toml.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime

from bench import data
from bench.report import Figure
from bench.stack import CpuMeter, Stack, cores_text
from pipeline import codec, kafka
from pipeline.core import rows
from pipeline.sink import migrations as ddl

TABLES = {"clicks": (codec.CLICK, rows.CLICKS), "postbacks": (codec.POSTBACK, rows.POSTBACKS)}


def _row(table: rows.Table, record: dict) -> tuple:
    """The row a plain clickhouse-connect client would insert for a decoded record."""
    out = []
    for column in table.columns:
        value = record[table.field_of(column)]
        if column in table.millis.values() and value is not None:
            value = datetime.fromtimestamp(value / 1000, UTC)
        out.append(value)
    return tuple(out)


def one_insert_per_table(client, database: str, messages: list, server_pid: int) -> dict:
    """The baseline: decode and shape rows (not timed), then time the inserts."""
    batches: dict[str, list[tuple]] = {name: [] for name in TABLES}
    for suffix, _key, value in messages:
        codec_, table = TABLES[suffix]
        batches[suffix].append(_row(table, codec_.decode(value)))
    ddl.migrate(client, database)
    meter = CpuMeter({"client": os.getpid(), "clickhouse": server_pid}).start()
    started = time.monotonic()
    for name, batch in batches.items():
        client.insert(f"{database}.{name}", batch, list(TABLES[name][1].columns))
    seconds = time.monotonic() - started
    count = sum(len(b) for b in batches.values())
    return {"rows": count, "seconds": seconds, "per_s": count / seconds, "cpu": meter.stop()}


def _count(client, database: str) -> int:
    sql = " + ".join(f"(SELECT count() FROM {database}.{name})" for name in TABLES)
    return int(client.command(f"SELECT {sql}"))


def measure(stack: Stack, clicks: int) -> list[Figure]:
    path, settings = stack.config("sink")
    messages = list(data.clicks_and_postbacks(settings, clicks))
    asyncio.run(kafka.ensure_topics(settings, ["clicks", "postbacks", "conversions"]))
    asyncio.run(data.produce(settings, messages))

    client = ddl.connect(settings.clickhouse_url)
    try:
        base_db = f"{settings.clickhouse_database}_base"
        base = one_insert_per_table(client, base_db, messages, stack.clickhouse.pid)
        expected, db = len(messages), settings.clickhouse_database
        proc = stack.pipeline("sink", path)
        meter = CpuMeter({"sink": proc.pid, "clickhouse": stack.clickhouse.pid})
        try:
            first = None
            deadline = time.monotonic() + 300
            while True:
                proc.check()
                try:
                    count = _count(client, db)
                except Exception:  # noqa: BLE001 - the sink has not migrated yet
                    count = 0
                now = time.monotonic()
                if count and first is None:
                    first = (now, count)
                    meter.start()
                    stack.profile(proc)
                if count >= expected:
                    break
                if now > deadline:
                    raise TimeoutError(f"the sink wrote {count} of {expected} rows in 300 s")
                time.sleep(0.1)
            cpu = meter.stop()
        finally:
            stack.stop(proc)
    finally:
        client.close()
    seconds = now - first[0]
    written = count - first[1]
    if written <= 0:
        raise RuntimeError("the sink wrote everything in one batch: too few rows to time")
    sink = {"rows": written, "seconds": seconds, "per_s": written / seconds, "total": count}
    sink["cpu"] = cpu
    return [
        Figure(
            "sink",
            ">= 0.8",
            value=sink["per_s"] / base["per_s"],
            measured=f"{sink['per_s']:,.0f} rows/s ({written:,} rows after the first batch "
            f"in {seconds:.1f} s)",
            baseline=f"clickhouse-connect, one insert per table: {base['per_s']:,.0f} rows/s "
            f"({base['rows']:,} rows in {base['seconds']:.2f} s; {cores_text(base['cpu'])})",
            note=f"clicks + postbacks 10:1, batch_rows {settings.sink_batch_rows}, "
            f"batch_seconds {settings.sink_batch_seconds:g}; {cores_text(cpu)}",
            numbers={"sink": sink, "baseline": base},
        )
    ]
