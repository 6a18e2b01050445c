"""Avro binary encoding of flat records, byte for byte what fastavro writes.

The ingress encodes one record per request; fastavro's `schemaless_writer`
spends most of its time on per-call set-up (a stream, schema dispatch), which
is several microseconds for a dozen fields. `record_encoder` builds, once per
schema, a plan of the fields and a function that writes them in order
(strings inline, other types through a writer each). It covers the types our
schemas use (string, int, long, bytes-backed decimal, and unions of null with
one of them) and returns None for anything else.

The writers accept only the canonical Python type of a field (`str`, `int`
but not `bool`, `Decimal`) and raise otherwise (TypeError, AttributeError,
KeyError, ValueError, OverflowError), so a caller can hand unusual records to
fastavro and get exactly its behaviour. Tests compare the bytes with fastavro
on every schema. Pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

Writer = Callable[[bytearray, object], None]

# zigzag varints of 0..63 are one byte: string lengths of short strings
_SMALL = tuple(bytes((n << 1,)) for n in range(64))
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1


def _varint(out: bytearray, n: int) -> None:
    """Append the zigzag varint of a long."""
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    n = (n << 1) ^ (n >> 63)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def long_bytes(n: int) -> bytes:
    """The zigzag varint of a long, as bytes (the counts of an Avro container)."""
    out = bytearray()
    _varint(out, n)
    return bytes(out)


def _write_bytes(out: bytearray, data: bytes) -> None:
    size = len(data)
    if size < 64:
        out += _SMALL[size]
    else:
        _varint(out, size)
    out += data


def _write_long(out: bytearray, value) -> None:
    if type(value) is not int:
        raise TypeError(f"{value!r} is not an int")
    _varint(out, value)


def _write_int(out: bytearray, value) -> None:
    if type(value) is not int:
        raise TypeError(f"{value!r} is not an int")
    if not _INT_MIN <= value <= _INT_MAX:
        raise OverflowError(f"{value} does not fit an Avro int")
    _varint(out, value)


def _decimal_writer(precision: int, scale: int) -> Writer:
    def write(out: bytearray, value) -> None:
        # the steps of fastavro's prepare_bytes_decimal, so the bytes agree
        if type(value) is not Decimal:
            raise TypeError(f"{value!r} is not a Decimal")
        sign, digits, exp = value.as_tuple()
        if len(digits) > precision:
            raise ValueError("The decimal precision is bigger than allowed by schema")
        delta = exp + scale  # TypeError for NaN and infinities (exp is a letter)
        if delta < 0:
            raise ValueError("Scale provided in schema does not match the decimal")
        unscaled = 0
        for digit in digits:
            unscaled = unscaled * 10 + digit
        unscaled *= 10**delta
        size = (unscaled.bit_length() + 8) // 8
        _write_bytes(out, (-unscaled if sign else unscaled).to_bytes(size, "big", signed=True))

    return write


_PRIMITIVES: dict[str, Writer] = {"long": _write_long, "int": _write_int}


def _writer(avro_type) -> Writer | None:
    if isinstance(avro_type, str):
        return _PRIMITIVES.get(avro_type)
    if (
        isinstance(avro_type, dict)
        and avro_type.get("type") == "bytes"
        and avro_type.get("logicalType") == "decimal"
    ):
        return _decimal_writer(avro_type["precision"], avro_type.get("scale", 0))
    return None


def _field_plan(avro_type) -> tuple[Writer | None, bool] | None:
    """(writer, nullable) of a field type; writer None means a string (written inline)."""
    nullable = False
    if isinstance(avro_type, list):
        if len(avro_type) != 2 or avro_type[0] != "null" or avro_type[1] == "null":
            return None
        nullable, avro_type = True, avro_type[1]
    if avro_type == "string":
        return None, nullable
    write = _writer(avro_type)
    return None if write is None else (write, nullable)


def record_encoder(schema: dict) -> Callable[[dict], bytes] | None:
    """An encoder for records of a flat record schema (parsed JSON), or None when
    the schema has a type this module does not write."""
    if schema.get("type") != "record":
        return None
    fields = []
    for field in schema["fields"]:
        plan = _field_plan(field["type"])
        if plan is None:
            return None
        fields.append((field["name"], *plan))
    plan = tuple(fields)

    def encode(record: dict) -> bytes:
        out = bytearray()
        for name, write, nullable in plan:
            value = record[name]
            if nullable:
                if value is None:
                    out.append(0)  # union branch 0: null
                    continue
                out.append(2)  # union branch 1, zigzag
            if write is None:
                # strings are most fields: written here, a call per field costs 10%
                data = value.encode()
                size = len(data)
                if size < 64:
                    out += _SMALL[size]
                else:
                    _varint(out, size)
                out += data
            else:
                write(out, value)
        return bytes(out)

    return encode
