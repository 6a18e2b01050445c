"""The hand-rolled Avro writer agrees with fastavro byte for byte, on every schema."""

import io
import random
import string
from decimal import Decimal

import fastavro
import pytest

from pipeline import avro, codec

CODECS = [codec.CLICK, codec.POSTBACK, codec.CONVERSION, codec.CALLBACK, codec.CALLBACK_TASK]
TEXT = string.printable + "éß中文🙂\u0000"


def fastavro_bytes(c: codec.Codec, record: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, c.schema, record)
    return out.getvalue()


def random_value(rng: random.Random, avro_type):
    if isinstance(avro_type, list):
        return None if rng.random() < 0.3 else random_value(rng, avro_type[1])
    if isinstance(avro_type, dict):  # decimal(18, 6): up to 18 digits, up to 6 decimals
        digits = rng.choice([1, 6, 7, 12, 18])
        unscaled = rng.randrange(-(10**digits) + 1, 10**digits)
        return Decimal(unscaled).scaleb(-rng.choice([0, 1, 3, 6]))
    if avro_type == "string":
        size = rng.choice([0, 1, 5, 36, 63, 64, 65, 200, 1000])
        return "".join(rng.choice(TEXT) for _ in range(size))
    bits = 31 if avro_type == "int" else 63
    edge = [0, -1, 1, 63, 64, -64, -65, 2**bits - 1, -(2**bits)]
    return rng.choice(edge) if rng.random() < 0.3 else rng.randrange(-(2**bits), 2**bits)


@pytest.mark.parametrize("c", CODECS, ids=[c.name for c in CODECS])
def test_fast_writer_matches_fastavro_on_random_records(c):
    encode = avro.record_encoder(c.raw_schema)
    assert encode is not None, f"{c.name} fell back to fastavro"
    rng = random.Random(c.name)
    for _ in range(1000):
        record = {f["name"]: random_value(rng, f["type"]) for f in c.raw_schema["fields"]}
        expected = fastavro_bytes(c, record)
        assert encode(record) == expected, record
        assert c.encode(record) == expected
        assert c.decode(expected) == record


@pytest.mark.parametrize(
    "value",
    [
        Decimal("0"),
        Decimal("0.000000"),
        Decimal("-0.000001"),
        Decimal("1E+3"),
        Decimal("999999999999.999999"),
        Decimal("-999999999999.999999"),
        Decimal("127.999999"),
        Decimal("128"),
        Decimal("-128"),
        Decimal("19.99"),
    ],
)
def test_decimals_match_fastavro(value):
    record = codec.POSTBACK.decode(
        codec.POSTBACK.encode(
            codec.POSTBACK.from_json(
                {
                    "postback_id": "p",
                    "received_at_ms": 1,
                    "click_id": "",
                    "click_ts_ms": None,
                    "advertiser": "",
                    "event": "",
                    "txn_id": None,
                    "revenue": None,
                    "currency": None,
                    "source_ip": "",
                    "outcome": "accepted",
                    "detail": "",
                    "raw": "",
                }
            )
        )
    )
    record["revenue"] = value
    encode = avro.record_encoder(codec.POSTBACK.raw_schema)
    assert encode(record) == fastavro_bytes(codec.POSTBACK, record)


@pytest.mark.parametrize(
    "field,value",
    [
        ("ts_ms", True),  # a bool is an int to fastavro, not to the fast writer
        ("ts_ms", 2**63),  # out of range
        ("ts_ms", 3.0),
        ("sub1", None),
        ("sub1", b"bytes"),
        ("user_agent", "missing"),
    ],
)
def test_unusual_values_behave_as_fastavro(field, value):
    """The fast writer refuses them; Codec.encode then gives fastavro's answer or error."""
    record = {
        "click_id": "c",
        "ts_ms": 1,
        "campaign_id": "c1",
        "pub": "net1",
        "sub1": "",
        "sub2": "",
        "sub3": "",
        "sub4": "",
        "sub5": "",
        "ip": "127.0.0.1",
        "user_agent": "ua",
    }
    if value == "missing":
        del record[field]
    else:
        record[field] = value
    try:
        expected = fastavro_bytes(codec.CLICK, record)
    except Exception as e:  # noqa: BLE001 - whatever fastavro raises, Codec.encode raises
        with pytest.raises(type(e)):
            codec.CLICK.encode(record)
    else:
        assert codec.CLICK.encode(record) == expected


def test_unsupported_schema_falls_back():
    assert (
        avro.record_encoder({"type": "record", "fields": [{"name": "x", "type": "double"}]}) is None
    )
    assert avro.record_encoder({"type": "enum", "symbols": ["a"]}) is None
