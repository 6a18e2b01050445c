"""The one path from a topic's record to a table's row: the sink sends undecoded
Avro bodies under `rows.Table.avro_schema` and ClickHouse shapes the rows. Every
schema example, and records at every edge, must come out as the row an analyst
expects: each column the field of its name, ms timestamps as UTC DateTime64."""

import io
import json
import random
from datetime import UTC, datetime
from decimal import Decimal

import fastavro
import pytest

from pipeline import codec
from pipeline.core import rows
from pipeline.sink import app as sink_app
from pipeline.sink import migrations as ddl

from .conftest import make_settings

ROUTES = sink_app.ROUTES
STRINGS = ("", "plain", "é€😀 ünïcode", "tab\t nl\n quote' dq\" backslash\\ nul\x00", "x" * 2000)
DECIMALS = tuple(
    Decimal(d) for d in ("0", "0.000001", "-0.000001", "3.5", "-999999999999.999999")
) + (Decimal("999999999999.999999"),)
MILLIS = (0, 1, 1_700_000_000_123, 1_764_111_600_999, 4_102_444_800_000)


def expected_row(table: rows.Table, record: dict) -> tuple:
    """What the table should hold for `record`: the expectation, written once for all
    tables from the mapping's two rules."""
    out = []
    for column in table.columns:
        value = record[table.field_of(column)]
        if column in table.millis.values() and value is not None:
            value = datetime.fromtimestamp(value / 1000, UTC)
        out.append(value)
    return tuple(out)


def examples(name: str) -> list[dict]:
    c = ROUTES[name][0]
    paths = sorted((codec.SCHEMA_DIR / "examples" / c.name).glob("*.json"))
    assert paths, c.name
    return [c.from_json(json.loads(path.read_text())) for path in paths]


def _value(avro_type, name: str, i: int, rnd: random.Random):
    if isinstance(avro_type, list):  # ["null", X]: null one time in three
        return None if rnd.random() < 1 / 3 else _value(avro_type[1], name, i, rnd)
    if isinstance(avro_type, dict) and avro_type.get("logicalType") == "decimal":
        return rnd.choice(DECIMALS)
    if avro_type == "string":
        # IDs unique per record: ReplacingMergeTree would merge equal sort keys
        return f"{name}-{i}" if name.endswith("_id") else rnd.choice(STRINGS)
    if avro_type == "long":
        return rnd.choice(MILLIS) if name.endswith("_ms") else rnd.choice((0, -5, 2**40, 7))
    if avro_type == "boolean":
        return rnd.random() < 0.5
    if avro_type == "int":
        return rnd.choice((0, 1, 200, 503, 65535)) if "status" in name else rnd.randrange(2**31)
    raise AssertionError(f"no test values for {avro_type!r}")


def records(c: codec.Codec, count: int) -> list[dict]:
    """Records touching every edge the tables care about: nulls, decimal extremes,
    unicode and control characters, the epoch and far-future timestamps."""
    rnd = random.Random(c.name)
    return [
        {f["name"]: _value(f["type"], f["name"], i, rnd) for f in c.raw_schema["fields"]}
        for i in range(count)
    ]


@pytest.mark.parametrize("name", ROUTES)
def test_container_holds_the_bodies_under_the_column_schema(name):
    c, table = ROUTES[name]
    recs = records(c, 50) + examples(name)
    container = codec.Container(table.avro_schema(c.raw_schema))
    read = list(fastavro.reader(io.BytesIO(container.file([c.encode(r) for r in recs]))))
    assert len(read) == len(recs)
    for field, column in table.millis.items():
        assert column in read[0] and field not in read[0]
    for got, rec in zip(read, recs, strict=True):
        assert tuple(got[k] for k in table.columns) == expected_row(table, rec)


def test_a_column_without_a_field_is_refused():
    table = rows.Table("t", ("click_id", "nope"))
    with pytest.raises(ValueError, match="nope"):
        table.avro_schema(codec.CLICK.raw_schema)


@pytest.mark.clickhouse
async def test_every_example_and_edge_becomes_its_row(clickhouse_url):
    """Every table the sink writes, through the sink's own write: the schema examples
    and records at every edge (nulls, decimal extremes, unicode and control
    characters, the epoch and far-future timestamps) read back as expected."""
    settings = make_settings("127.0.0.1:9", clickhouse_url)
    db = settings.clickhouse_database
    client = ddl.connect(clickhouse_url)
    sink = sink_app.build(settings)
    sink.client = client
    try:
        ddl.migrate(client, db)
        batch, want = {}, {}
        for name, (c, table) in ROUTES.items():
            recs = records(c, 300) + examples(name)
            batch[settings.topic(name)] = [c.encode(r) for r in recs]
            # clickhouse-connect reads DateTime64(3, 'UTC') as naive UTC datetimes
            naive = (
                tuple(v.replace(tzinfo=None) if isinstance(v, datetime) else v for v in row)
                for row in (expected_row(table, r) for r in recs)
            )
            want[table.name] = sorted(naive, key=repr)
        await sink._write(batch)
        for _, table in ROUTES.values():
            cols = ", ".join(table.columns)
            got = client.query(f"SELECT {cols} FROM {db}.{table.name} FINAL").result_rows
            assert sorted(got, key=repr) == want[table.name], table.name
    finally:
        client.close()
