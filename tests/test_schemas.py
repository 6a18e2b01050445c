"""Every example message round-trips through its schema, and the Python side agrees."""

import json
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest

from pipeline import codec

EXAMPLES = sorted((codec.SCHEMA_DIR / "examples").glob("*/*.json"))
CODECS = {
    "click": codec.CLICK,
    "postback": codec.POSTBACK,
    "conversion": codec.CONVERSION,
    "callback": codec.CALLBACK,
    "callback_task": codec.CALLBACK_TASK,
    "skan_report": codec.SKAN_REPORT,
    "skan_postback": codec.SKAN_POSTBACK,
    "ledger": codec.LEDGER,
    "adjustment": codec.ADJUSTMENT,
}


def test_every_schema_has_examples():
    for schema in codec.SCHEMA_DIR.glob("*.avsc"):
        assert list((codec.SCHEMA_DIR / "examples" / schema.stem).glob("*.json")), schema.stem


@pytest.mark.parametrize("path", EXAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in EXAMPLES])
def test_example_round_trips(path: Path):
    c = CODECS[path.parent.name]
    record = c.from_json(json.loads(path.read_text()))
    assert fastavro.validate(record, c.schema)
    assert c.decode(c.encode(record)) == record


def test_every_table_is_fed_by_its_schema():
    from pipeline.sink.app import ROUTES

    for c, table in ROUTES.values():
        table.avro_schema(c.raw_schema)  # raises when a column has no field


@pytest.mark.parametrize("name", ["conversion", "callback_task"])
def test_cached_decimals_decode_the_same_values(name):
    plain, cached = CODECS[name], codec.Codec(name, cached_decimals=True)
    for path in (codec.SCHEMA_DIR / "examples" / name).glob("*.json"):
        record = plain.from_json(json.loads(path.read_text()))
        for amount in ("0", "2", "1.998", "-3.5", "123456789012.123456"):
            record = {**record, "revenue": Decimal(amount), "payout": Decimal(amount)}
            payload = plain.encode(record)
            for _ in range(2):  # the second read comes from the cache
                decoded = cached.decode(payload)
                assert decoded == plain.decode(payload)
                assert {k: str(v) for k, v in decoded.items()} == {
                    k: str(v) for k, v in plain.decode(payload).items()
                }
