"""The sink sends undecoded Avro bodies and lets ClickHouse shape the rows: the
tables must hold exactly what the Python row shaping (`rows.Table.row`) gives."""

import io
import random
from decimal import Decimal

import fastavro
import pytest

from pipeline import codec
from pipeline.sink import ddl, rows
from pipeline.sink.sink import ROUTES, Sink

from .conftest import make_settings

STRINGS = ("", "plain", "é€😀 ünïcode", "tab\t nl\n quote' dq\" backslash\\ nul\x00", "x" * 2000)
DECIMALS = tuple(
    Decimal(d) for d in ("0", "0.000001", "-0.000001", "3.5", "-999999999999.999999")
) + (Decimal("999999999999.999999"),)
MILLIS = (0, 1, 1_700_000_000_123, 1_764_111_600_999, 4_102_444_800_000)


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
    recs = records(c, 50)
    container = codec.Container(table.avro_schema(c.raw_schema))
    read = list(fastavro.reader(io.BytesIO(container.file([c.encode(r) for r in recs]))))
    assert len(read) == len(recs)
    for field, column in table.millis.items():
        assert column in read[0] and field not in read[0]
    # same values, under the column names (timestamps as datetimes, as rows.ts gives)
    for got, rec in zip(read, recs, strict=True):
        row = dict(zip(table.columns, table.row(rec), strict=True))
        assert {k: got[k] for k in table.columns} == row


def test_a_column_without_a_field_is_refused():
    table = rows.Table("t", ("click_id", "nope"), rows.click_row)
    with pytest.raises(ValueError, match="nope"):
        table.avro_schema(codec.CLICK.raw_schema)


@pytest.mark.clickhouse
async def test_avro_inserts_equal_python_rows(clickhouse_url):
    """Every table the sink writes: rows shaped in Python and inserted by
    clickhouse-connect, against the sink's own Avro write of the same messages."""
    settings = make_settings("127.0.0.1:9", clickhouse_url)
    db = settings.clickhouse_database
    client = ddl.connect(clickhouse_url)
    sink = Sink(settings)
    sink.client = client
    try:
        ddl.migrate(client, db)
        ddl.migrate(client, f"{db}_py")
        batch = {}
        for name, (c, table) in ROUTES.items():
            bodies = [c.encode(r) for r in records(c, 500)]
            batch[settings.topic(name)] = bodies
            data = [table.row(c.decode(b)) for b in bodies]
            client.insert(f"{db}_py.{table.name}", data, list(table.columns))
        await sink._write(batch)

        for _, table in ROUTES.values():
            cols = ", ".join(table.columns)
            key = ", ".join(table.columns)  # every column: a total order
            sql = "SELECT {cols} FROM {db}.{t} FINAL ORDER BY {key}"
            want = client.query(sql.format(cols=cols, db=f"{db}_py", t=table.name, key=key))
            got = client.query(sql.format(cols=cols, db=db, t=table.name, key=key))
            assert len(got.result_rows) == 500, table.name
            assert got.result_rows == want.result_rows, table.name
            # and byte for byte as ClickHouse stores them (types, nulls, time zones)
            text = "SELECT {cols} FROM {db}.{t} FINAL ORDER BY {key} FORMAT TSVWithNamesAndTypes"
            assert client.raw_query(
                text.format(cols=cols, db=db, t=table.name, key=key)
            ) == client.raw_query(text.format(cols=cols, db=f"{db}_py", t=table.name, key=key))
    finally:
        client.close()
