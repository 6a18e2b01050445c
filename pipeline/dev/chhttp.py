"""ClickHouse HTTP interface semantics, as plain functions of request values.

Nothing here touches chDB, sockets or the event loop: these functions turn URL
parameters, headers and bodies into what the engine should run, and engine
errors into what a ClickHouse server would answer. The server in
`clickhouse.py` wires them to aiohttp and a chDB session.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import lz4.frame
from backports import zstd  # Python 3.14 ships this as compression.zstd

try:
    import brotli
except ImportError:  # optional: clickhouse-connect only offers br when it is installed
    brotli = None

# URL parameters the HTTP layer consumes itself; every other one is a ClickHouse
# setting, as a real server reads its URL. chDB rejects most of these as unknown
# settings, the rest only mean something to a network server, and `readonly`, once
# SET, could never be reset on the one shared session.
TRANSPORT_PARAMS = frozenset(
    """query database default_format user password quota_key role query_id session_id
    session_timeout session_check close_session compress decompress buffer_size
    wait_end_of_query stacktrace client_protocol_version send_progress_in_http_headers
    http_headers_progress_interval_ms enable_http_compression http_wait_end_of_query
    cancel_http_readonly_queries_on_client_close http_response_buffer_size readonly""".split()
)

_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A trailing FORMAT clause of a statement, e.g. clickhouse-connect's "\n FORMAT Native".
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
# The head of an INSERT whose data follows in the same text: the first
# "FORMAT <name>" that ends a line. clickhouse-connect sends Native inserts this
# way ("INSERT INTO t (a, b) FORMAT Native\n<binary>"), with no query parameter.
_INSERT_HEAD = re.compile(
    rb"\s*(INSERT\b.*?)\bFORMAT\s+([A-Za-z0-9_]+)[ \t]*(?:\r?\n|$)", re.I | re.S
)
_INLINE_DATA = re.compile(rb"\b(?:VALUES|SELECT)\b", re.I)
_INSERT_HEAD_SCAN = 64 * 1024  # never regex-scan megabytes of binary row data
_LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*", re.S)
_KEYWORD = re.compile(r"[A-Za-z]+")
_RESULT_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXISTS", "EXPLAIN"})
_CODE = re.compile(r"Code: (\d+)\.")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*$")
_VERSION_SUFFIX = re.compile(r"\s*\(version [^)]*\)\s*$")

# What ClickHouse's exceptionCodeToHTTPStatus answers; anything else is a 500.
_BAD_REQUEST = frozenset(
    """BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE
    CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER
    CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6
    CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN ILLEGAL_COLUMN
    UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE TOO_DEEP_AST TOO_BIG_AST
    UNEXPECTED_AST_STRUCTURE VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE SYNTAX_ERROR INCORRECT_DATA
    TYPE_MISMATCH CANNOT_DECOMPRESS""".split()
)
_NOT_FOUND = frozenset(
    """UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE
    UNKNOWN_DATABASE UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION
    UNKNOWN_FORMAT UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE""".split()
)
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}


_BINARY_FORMATS = ("Native", "RowBinary", "Parquet", "Arrow", "ORC", "Avro", "MsgPack", "BSON")


class ClickHouseError(Exception):
    """An error in ClickHouse's own terms: numeric code, symbolic name, message."""

    def __init__(self, code: int, name: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code, self.name, self.message = code, name, message
        self.status = status if status is not None else http_status(name)

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Read code and name out of chDB's "Code: 60. DB::Exception: ... (UNKNOWN_TABLE)"
        text, which chDB wraps in prefixes like "Streaming insert finish failed: "."""
        text = str(exc).strip()
        text = text[text.find("Code: ") :] if "Code: " in text else text
        text = _VERSION_SUFFIX.sub("", text)
        code, name = _CODE.match(text), _NAME.search(text)
        if code is None:
            return cls(1001, "STD_EXCEPTION", text)  # what ClickHouse reports for a foreign error
        prefix = f"Code: {code.group(1)}. DB::Exception: "
        message = text[len(prefix) :] if text.startswith(prefix) else text
        message = _NAME.sub("", message).rstrip().rstrip(".")
        return cls(int(code.group(1)), name.group(1) if name else "UNKNOWN_EXCEPTION", message)

    def body(self, version: str) -> str:
        """The response body ClickHouse writes, which clickhouse-connect quotes verbatim."""
        return (
            f"Code: {self.code}. DB::Exception: {self.message}. ({self.name}) (version {version})\n"
        )


def http_status(name: str) -> int:
    """HTTP status ClickHouse answers for an exception name."""
    if name in _BAD_REQUEST:
        return 400
    if name in _NOT_FOUND:
        return 404
    return 501 if name == "NOT_IMPLEMENTED" else 500


@dataclass(frozen=True)
class Statement:
    """One request, ready for the engine.

    With `insert_format` set, `sql` is an INSERT head without FORMAT and `data` is
    its rows in that format (fed to chDB's streaming inserter, which takes binary
    Native as well as text). Otherwise `sql` is run as is, and `output_format` is
    the format of its result unless the SQL names its own.
    """

    sql: str
    output_format: str = "TabSeparated"
    insert_format: str | None = None
    data: bytes = b""
    database: str = "default"
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @cached_property
    def result_format(self) -> str | None:
        """The format of the response body, or None for a statement without a result
        (ClickHouse then sends no X-ClickHouse-Format, which clickhouse-connect's
        command() reads as "no result")."""
        if self.insert_format is not None:
            return None
        trailing = _TRAILING_FORMAT.search(self.sql)
        if trailing:
            return trailing.group(1)
        start = _LEADING_NOISE.match(self.sql).end()
        keyword = _KEYWORD.match(self.sql, start)
        if keyword and keyword.group(0).upper() in _RESULT_KEYWORDS:
            return self.output_format
        return None


def without_format(sql: str) -> str:
    """The statement without its trailing FORMAT clause (and semicolon)."""
    trailing = _TRAILING_FORMAT.search(sql)
    return (sql[: trailing.start()] if trailing else sql).rstrip().rstrip(";")


def native_header(columns: list[tuple[str, str]]) -> bytes:
    """A Native block with these (name, type) columns and no rows: what ClickHouse
    sends for an empty result, and what clickhouse-connect reads column names from."""
    out = bytearray(_varuint(len(columns)) + _varuint(0))
    for name, type_name in columns:
        for text in (name.encode(), type_name.encode()):
            out += _varuint(len(text)) + text
    return bytes(out)


def plan_statement(params: dict[str, str], headers: Mapping[str, str], body: bytes) -> Statement:
    """Split a request into statement, data, settings and query parameters the way
    ClickHouse does: with `?query=`, the body is data appended to the query;
    without it, the body is the query (and may carry data after FORMAT <name>).

    Raises ClickHouseError for an undecodable or settings-invalid request.
    """
    query = params.get("query")
    database = params.get("database") or headers.get("X-ClickHouse-Database") or "default"
    output_format = (
        params.get("default_format") or headers.get("X-ClickHouse-Format") or "TabSeparated"
    )
    common = {
        "output_format": output_format,
        "database": database,
        "settings": request_settings(params),
        "params": {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")},
    }
    if query is not None and not body:
        return Statement(sql=query, **common)
    if query is not None:
        trailing = _TRAILING_FORMAT.search(query)
        if trailing and re.match(r"\s*INSERT\b", query, re.I):
            head = query[: trailing.start()]
            return Statement(sql=head, insert_format=trailing.group(1), data=body, **common)
        return Statement(sql=query + "\n" + _text(body), **common)
    head = _INSERT_HEAD.match(body[:_INSERT_HEAD_SCAN])
    # VALUES or SELECT before it: that FORMAT sits inside the statement's own data.
    if head and not _INLINE_DATA.search(head.group(1)):
        data = body[head.end() :]
        return Statement(
            sql=_text(head.group(1)), insert_format=head.group(2).decode(), data=data, **common
        )
    return Statement(sql=_text(body), **common)


def request_settings(params: dict[str, str]) -> dict[str, str]:
    """The ClickHouse settings a request carries: every URL parameter that is not
    consumed by the HTTP layer or a query parameter (`param_*`)."""
    settings = {
        k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")
    }
    for name in settings:
        if not _SETTING_NAME.fullmatch(name):
            raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
    return settings


def set_statement(changes: dict[str, str | None]) -> str:
    """One SET statement applying `changes`; None restores a setting's default.
    Values are quoted: ClickHouse casts quoted literals to numeric settings."""

    def literal(value: str | None) -> str:
        if value is None:
            return "DEFAULT"
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return "SET " + ", ".join(f"{name} = {literal(value)}" for name, value in changes.items())


def decode_body(data: bytes, encoding: str | None) -> bytes:
    """Undo a request's Content-Encoding. clickhouse-connect compresses each insert
    block separately, so lz4, zstd and gzip bodies are concatenated frames."""
    method = (encoding or "").strip().lower()
    try:
        if method in ("", "identity"):
            return data
        if method == "gzip":
            return gzip.decompress(data)
        if method == "deflate":
            return zlib.decompress(data)
        if method == "zstd":
            return zstd.decompress(data)
        if method == "lz4":
            return _lz4_frames(data)
        if method == "br" and brotli is not None:
            return brotli.decompress(data)
    except Exception as exc:  # every codec has its own error type
        raise ClickHouseError(
            271, "CANNOT_DECOMPRESS", f"Cannot decompress {method} body: {exc}"
        ) from exc
    raise ClickHouseError(
        48,
        "NOT_IMPLEMENTED",
        f"Unsupported Content-Encoding '{encoding}': use gzip, deflate, zstd or lz4",
        status=415,
    )


def choose_encoding(accept_encoding: str | None) -> str | None:
    """The first method in the client's Accept-Encoding list that we can produce."""
    for item in (accept_encoding or "").split(","):
        method = item.split(";")[0].strip().lower()
        if method in ("gzip", "deflate", "zstd", "lz4") or (method == "br" and brotli is not None):
            return method
    return None


def encode_body(data: bytes, method: str) -> bytes:
    """Compress a response body with a method `choose_encoding` returned."""
    if method == "gzip":
        return gzip.compress(data, compresslevel=1)
    if method == "deflate":
        return zlib.compress(data, 1)
    if method == "zstd":
        return zstd.compress(data)
    if method == "lz4":
        return lz4.frame.compress(data)
    return brotli.compress(data)


def content_type(fmt: str | None) -> str:
    """Content-Type ClickHouse sends for an output format (text unless binary)."""
    if fmt in _CONTENT_TYPES:
        return _CONTENT_TYPES[fmt]
    binary = fmt and fmt.startswith(_BINARY_FORMATS)
    return "application/octet-stream" if binary else "text/plain; charset=UTF-8"


def _varuint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _lz4_frames(data: bytes) -> bytes:
    out = []
    while data:
        decoder = lz4.frame.LZ4FrameDecompressor()
        out.append(decoder.decompress(data))
        if not decoder.eof:
            raise ValueError("truncated lz4 frame")
        data = decoder.unused_data
    return b"".join(out)


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ClickHouseError(
            27,
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
            f"Query text is not valid UTF-8 at byte {exc.start}; "
            "send binary data after FORMAT <name>",
        ) from exc
