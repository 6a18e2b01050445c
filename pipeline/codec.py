"""Avro codecs for everything that crosses Kafka.

Each schema in `schemas/` is parsed once, at import; a message is the bare
Avro binary body (no framing): the topic names the schema, and schemas evolve
only by adding fields with defaults. Pure functions of bytes and dicts.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from decimal import Context, Decimal
from functools import lru_cache
from importlib.resources import files

import fastavro

from pipeline import avro

# the repository's top-level schemas/, installed as the package `pipeline.schemas`
SCHEMA_DIR = files("pipeline.schemas")


class Codec:
    """Encode and decode one record type; the schema is parsed once.

    With `cached_decimals`, `decode` reads the record's decimal fields as their
    bytes and turns them into the same Decimal values through a cache: for a
    consumer of many records with few distinct amounts (a campaign's payouts),
    where building Decimals is a third of the decoding time.
    """

    def __init__(self, name: str, cached_decimals: bool = False):
        self.name = name
        self.raw_schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        self.schema = fastavro.parse_schema(self.raw_schema)
        self.fields = tuple(field["name"] for field in self.raw_schema["fields"])
        self._read_schema, self._decimals = self.schema, ()
        if cached_decimals:
            plain = [f for f in self.raw_schema["fields"] if _is_bytes_decimal(f["type"])]
            self._decimals = tuple(
                (f["name"], f["type"]["precision"], f["type"].get("scale", 0)) for f in plain
            )
            # the same binary encoding, read as bytes
            raw = {
                **self.raw_schema,
                "fields": [
                    {**f, "type": "bytes"} if f in plain else f for f in self.raw_schema["fields"]
                ],
            }
            self._read_schema = fastavro.parse_schema(raw)
        # byte-for-byte fastavro's output, at about half the cost (the ingress's hot path)
        self._fast_encode = avro.record_encoder(self.raw_schema)

    def encode(self, record: dict) -> bytes:
        if self._fast_encode is not None:
            try:
                return self._fast_encode(record)
            except (TypeError, AttributeError, KeyError, ValueError, OverflowError):
                pass  # an unusual value: fastavro encodes it, or says what is wrong, as before
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, payload: bytes) -> dict:
        if not self._decimals:
            return fastavro.schemaless_reader(io.BytesIO(payload), self.schema, self.schema)
        record = fastavro.schemaless_reader(io.BytesIO(payload), self._read_schema, None)
        for name, precision, scale in self._decimals:
            record[name] = _decimal(record[name], precision, scale)
        return record

    def from_json(self, obj: dict) -> dict:
        """A record from JSON (example files): decimal fields are written as strings."""
        out = dict(obj)
        for field in self.raw_schema["fields"]:
            if _is_decimal(field["type"]) and isinstance(out.get(field["name"]), str):
                out[field["name"]] = Decimal(out[field["name"]])
        return out


class Container:
    """Bare bodies written with one schema -> an Avro Object Container File.

    The file is the header (magic, `avro.schema`, `avro.codec` null, sync
    marker) and one block: the body count, the byte count, the bodies
    concatenated as they are, the sync marker again. No body is decoded, so a
    batch costs a join. The header names the schema the bodies were *written*
    with; it may rename fields or add logical types, which never change the
    binary encoding. The header is built once.
    """

    def __init__(self, schema: dict):
        self.schema = schema
        self._sync = os.urandom(16)
        meta = {b"avro.schema": json.dumps(schema).encode(), b"avro.codec": b"null"}
        header = bytearray(b"Obj\x01") + avro.long_bytes(len(meta))
        for key, value in meta.items():
            header += avro.long_bytes(len(key)) + key + avro.long_bytes(len(value)) + value
        self._header = bytes(header + avro.long_bytes(0) + self._sync)

    def file(self, bodies: Sequence[bytes]) -> bytes:
        """One file holding `bodies` in order (at least one)."""
        data = b"".join(bodies)
        counts = avro.long_bytes(len(bodies)) + avro.long_bytes(len(data))
        return b"".join((self._header, counts, data, self._sync))


def _is_bytes_decimal(avro_type) -> bool:
    """A decimal field that is not in a union (its bytes are the whole field)."""
    return (
        isinstance(avro_type, dict)
        and avro_type.get("type") == "bytes"
        and avro_type.get("logicalType") == "decimal"
    )


@lru_cache(maxsize=4096)
def _decimal(data: bytes, precision: int, scale: int) -> Decimal:
    """What fastavro makes of a bytes decimal (Decimals are immutable: shared freely)."""
    context = Context(prec=precision)
    return context.create_decimal(int.from_bytes(data, "big", signed=True)).scaleb(-scale, context)


def _is_decimal(avro_type) -> bool:
    if isinstance(avro_type, list):
        return any(_is_decimal(t) for t in avro_type)
    return isinstance(avro_type, dict) and avro_type.get("logicalType") == "decimal"


CLICK = Codec("click")
POSTBACK = Codec("postback")
CONVERSION = Codec("conversion")
CALLBACK = Codec("callback")
CALLBACK_TASK = Codec("callback_task")
SKAN_REPORT = Codec("skan_report")
SKAN_POSTBACK = Codec("skan_postback")
LEDGER = Codec("ledger")
ADJUSTMENT = Codec("adjustment")
