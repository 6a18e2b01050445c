"""The embedded ClickHouse: chDB behind ClickHouse's HTTP interface.

Plain HTTP requests stand in for curl; clickhouse-connect, a blocking client,
runs in a worker thread because the server shares the test's event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import signal
import sys
from decimal import Decimal
from pathlib import Path

import aiohttp
import clickhouse_connect
import lz4.frame
import pytest
from backports import zstd
from clickhouse_connect.driver.exceptions import DatabaseError

from pipeline.dev.chhttp import ClickHouseError, decode_body, plan_statement
from pipeline.dev.clickhouse import EmbeddedClickHouse

pytestmark = pytest.mark.clickhouse

REPO = Path(__file__).resolve().parents[1]

TABLE_DDL = """
CREATE TABLE {name} (
    id UInt64, delta Int32, label String, note Nullable(String),
    kind LowCardinality(String), at DateTime64(3, 'UTC'), amount Decimal(18, 4),
    tags Map(String, UInt32), items Array(String)
) ENGINE = MergeTree ORDER BY id
"""


def sample_rows(count: int) -> list[list]:
    start = dt.datetime(2024, 5, 1, 12, 0, 0, 123000)
    return [
        [
            i,
            -i,
            f"label-{i}",
            None if i % 2 else f"note-{i}",
            ("click", "install", "purchase")[i % 3],
            start + dt.timedelta(seconds=i),
            Decimal("12.3456") * i,
            {"k": i},
            ["x", str(i)],
        ]
        for i in range(count)
    ]


@pytest.fixture
async def server(tmp_path):
    embedded = EmbeddedClickHouse(tmp_path / "clickhouse", port=0)
    await embedded.start()
    yield embedded
    await embedded.stop()


@pytest.fixture
async def http():
    # auto_decompress off: the tests check what the server puts on the wire.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def port_of(server: EmbeddedClickHouse) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def fetch(http, method, url, *, params=None, data=None, headers=None):
    async with http.request(method, url, params=params, data=data, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def post(http, url, query, data=None, **params):
    """curl --data-binary DATA 'URL/?query=QUERY&PARAMS': status, headers, body."""
    return await fetch(http, "POST", url, params={"query": query, **params}, data=data)


async def test_ping_and_bare_root(server, http):
    assert (await fetch(http, "GET", server.url + "/ping"))[2] == b"Ok.\n"
    status, _, body = await fetch(http, "GET", server.url + "/")
    assert (status, body) == (200, b"Ok.\n")


async def test_get_and_post_like_curl(server, http):
    status, headers, body = await fetch(
        http, "GET", server.url, params={"query": "SELECT 1 AS one, 'a' AS two"}
    )
    assert (status, body) == (200, b"1\ta\n")  # TabSeparated unless told otherwise
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["Content-Type"].startswith("text/tab-separated-values")
    assert headers["X-ClickHouse-Query-Id"]
    assert headers["X-ClickHouse-Timezone"]
    assert json.loads(headers["X-ClickHouse-Summary"])["read_rows"] == "1"

    # POST without ?query=: the body is the query.
    assert (await fetch(http, "POST", server.url, data=b"SELECT 40 + 2"))[2] == b"42\n"
    # With ?query=, the body is appended to it.
    params = {"query": "SELECT number FROM numbers(3) WHERE"}
    assert (await fetch(http, "POST", server.url, params=params, data=b"number > 0"))[2] == (
        b"1\n2\n"
    )
    # default_format, credentials in parameters and headers (accepted, not enforced).
    params = {"query": "SELECT 7 AS n", "default_format": "JSONEachRow", "user": "default"}
    auth = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "secret"}
    status, headers, body = await fetch(http, "GET", server.url, params=params, headers=auth)
    assert json.loads(body) == {"n": 7}
    assert headers["X-ClickHouse-Format"] == "JSONEachRow"
    # A FORMAT clause in the query wins over default_format.
    params["query"] = "SELECT 7 AS n FORMAT CSV"
    assert (await fetch(http, "GET", server.url, params=params))[2] == b"7\n"


async def test_database_param_and_settings_stay_per_request(server, http):
    url = server.url
    assert (await post(http, url, "CREATE DATABASE attribution"))[0] == 200
    ddl = "CREATE TABLE t (a UInt8) ENGINE = Memory"
    assert (await post(http, url, ddl, database="attribution"))[0] == 200
    current = "SELECT currentDatabase()"
    assert (await post(http, url, current, database="attribution"))[2] == b"attribution\n"
    assert (await post(http, url, current))[2] == b"default\n"
    as_header = {"x-clickhouse-database": "attribution"}
    _, _, body = await fetch(http, "POST", url, data=current.encode(), headers=as_header)
    assert body == b"attribution\n"
    # URL parameters that are not transport parameters are ClickHouse settings...
    setting = "SELECT value FROM system.settings WHERE name = 'max_threads'"
    assert (await post(http, url, setting, max_threads="3"))[2] == b"3\n"
    # ...for that request only.
    assert (await post(http, url, setting))[2] != b"3\n"
    status, headers, body = await post(http, url, "SELECT 1", no_such_setting="1")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "115")


async def test_plain_http_inserts(server, http):
    url = server.url
    await fetch(http, "POST", url, data=b"CREATE TABLE t (id UInt32, name String) ENGINE = Memory")
    json_rows = b'{"id": 1, "name": "one"}\n{"id": 2, "name": "two"}\n'
    status, headers, body = await post(http, url, "INSERT INTO t FORMAT JSONEachRow", json_rows)
    assert (status, body) == (200, b"")
    assert "X-ClickHouse-Format" not in headers
    assert json.loads(headers["X-ClickHouse-Summary"])["written_rows"] == "2"
    await post(http, url, "INSERT INTO t FORMAT CSV", b'3,"three"\n')
    await post(http, url, "INSERT INTO t FORMAT TabSeparated", b"4\tfour\n")
    await post(http, url, "INSERT INTO t VALUES", b"(5, 'five')")
    await fetch(http, "POST", url, data=b"INSERT INTO t FORMAT JSONEachRow\n" + b'{"id": 6}\n')
    for encoding, packed in [
        ("gzip", gzip.compress(b"7\tseven\n")),
        ("zstd", zstd.compress(b"8\teight\n")),
        ("lz4", lz4.frame.compress(b"9\tni") + lz4.frame.compress(b"ne\n")),  # two frames
    ]:
        status, _, body = await fetch(
            http, "POST", url, params={"query": "INSERT INTO t FORMAT TabSeparated"},
            data=packed, headers={"Content-Encoding": encoding},
        )  # fmt: skip
        assert status == 200, body
    _, _, body = await post(
        http, url, "SELECT id, name FROM t ORDER BY id FORMAT JSONCompactEachRow"
    )
    rows = [json.loads(line) for line in body.splitlines()]
    assert rows == [
        [1, "one"], [2, "two"], [3, "three"], [4, "four"], [5, "five"],
        [6, ""], [7, "seven"], [8, "eight"], [9, "nine"],
    ]  # fmt: skip


async def test_errors_look_like_clickhouse(server, http):
    status, headers, body = await fetch(
        http, "GET", server.url, params={"query": "SELECT * FROM missing_table"}
    )
    text = body.decode()
    assert status == 404
    assert headers["X-ClickHouse-Exception-Code"] == "60"
    assert text.startswith("Code: 60. DB::Exception: ")
    assert "missing_table" in text and "(UNKNOWN_TABLE) (version " in text
    status, headers, body = await fetch(http, "POST", server.url, data=b"SELEC 1")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (400, "62")
    assert b"(SYNTAX_ERROR)" in body
    status, headers, _ = await fetch(
        http, "POST", server.url, data=b"\x00", headers={"Content-Encoding": "snappy"}
    )
    assert status == 415 and headers["X-ClickHouse-Exception-Code"] == "48"
    # Bad data in an insert is reported and leaves nothing behind.
    await fetch(http, "POST", server.url, data=b"CREATE TABLE n (a UInt8) ENGINE = Memory")
    params = {"query": "INSERT INTO n FORMAT JSONEachRow"}
    status, _, body = await fetch(http, "POST", server.url, params=params, data=b'{"a": "x"}\n')
    assert status == 400 and b"Code: " in body
    params = {"query": "SELECT count() FROM n"}
    assert (await fetch(http, "GET", server.url, params=params))[2] == b"0\n"


async def test_compressed_responses_when_asked(server, http):
    params = {"query": "SELECT number FROM numbers(1000)", "enable_http_compression": "1"}
    expected = b"".join(b"%d\n" % i for i in range(1000))
    for encoding, unpack in [
        ("gzip", gzip.decompress),
        ("zstd", zstd.decompress),
        ("lz4", lz4.frame.decompress),
    ]:
        status, headers, body = await fetch(
            http, "GET", server.url, params=params, headers={"Accept-Encoding": encoding}
        )
        assert headers["Content-Encoding"] == encoding
        assert unpack(body) == expected
    # Without the setting the answer is plain, as from ClickHouse.
    del params["enable_http_compression"]
    _, headers, body = await fetch(
        http, "GET", server.url, params=params, headers={"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in headers and body == expected


# True is clickhouse-connect's default: lz4 inserts, Accept-Encoding on queries.
@pytest.mark.parametrize("compress", [True, "zstd", "gzip", False], ids=str)
async def test_clickhouse_connect_round_trip(server, compress):
    def scenario():
        client = clickhouse_connect.get_client(port=port_of(server), compress=compress)
        try:
            assert client.server_version
            client.command("CREATE DATABASE attribution")
            client.command(TABLE_DDL.format(name="attribution.conversions"))
            rows = sample_rows(2500)
            summary = client.insert("attribution.conversions", rows)
            assert summary.written_rows == 2500
            result = client.query("SELECT * FROM attribution.conversions ORDER BY id")
            assert [list(row) for row in result.result_rows] == rows
            assert client.command("SELECT count() FROM attribution.conversions") == 2500
            bound = client.query(
                "SELECT count() FROM attribution.conversions WHERE kind = {kind:String}",
                parameters={"kind": "install"},
            )
            assert bound.result_rows == [(833,)]
            empty = client.query("SELECT id, kind FROM attribution.conversions WHERE id > 10000")
            assert (empty.column_names, empty.result_rows) == (("id", "kind"), [])
            with pytest.raises(DatabaseError, match="UNKNOWN_TABLE") as raised:
                client.query("SELECT * FROM attribution.missing")
            assert raised.value.code == 60
        finally:
            client.close()

    await asyncio.to_thread(scenario)


async def test_async_clickhouse_connect_client(server):
    client = await clickhouse_connect.get_async_client(port=port_of(server))
    try:
        await client.command(TABLE_DDL.format(name="conversions"))
        rows = sample_rows(100)
        assert (await client.insert("conversions", rows)).written_rows == 100
        result = await client.query("SELECT * FROM conversions ORDER BY id")
        assert [list(row) for row in result.result_rows] == rows
    finally:
        await client.close()


async def test_event_loop_stays_responsive_during_a_query(server, http):
    slow = asyncio.create_task(post(http, server.url, "SELECT sleep(1)"))
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    assert (await fetch(http, "GET", server.url + "/ping"))[2] == b"Ok.\n"
    assert asyncio.get_running_loop().time() - started < 0.5
    assert (await slow)[0] == 200


async def test_second_owner_of_a_directory_is_refused(server, http):
    intruder = EmbeddedClickHouse(server.path, port=0)
    with pytest.raises(RuntimeError, match=str(server.path)):
        await intruder.start()
    await intruder.stop()  # harmless after a failed start
    assert (await fetch(http, "GET", server.url, params={"query": "SELECT 1"}))[2] == b"1\n"


async def test_data_survives_a_restart(tmp_path, http):
    # chDB can close and reopen the same path within one process.
    for generation in range(2):
        embedded = EmbeddedClickHouse(tmp_path / "clickhouse", port=0)
        await embedded.start()
        try:
            if generation == 0:
                await fetch(http, "POST", embedded.url, data=TABLE_DDL.format(name="kept").encode())
                params = {"query": "INSERT INTO kept (id, label) FORMAT JSONEachRow"}
                await fetch(http, "POST", embedded.url, params=params, data=b'{"id":1,"label":"a"}')
            else:
                params = {"query": "SELECT id, label FROM kept"}
                assert (await fetch(http, "GET", embedded.url, params=params))[2] == b"1\ta\n"
        finally:
            await embedded.stop()
            await embedded.stop()  # idempotent


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_module_serves_until_signalled(tmp_path, http, stop_signal):
    data_dir = tmp_path / "clickhouse"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.dev.clickhouse",
        "--path", str(data_dir), "--listen", "127.0.0.1:0",
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        url = None
        while url is None:  # chDB may print to stdout too
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
            assert line, "server exited before announcing its URL"
            if b" at http://" in line:
                url = line.decode().rsplit(" at ", 1)[1].strip()
        params = {"query": "SELECT 'hello'"}
        assert (await fetch(http, "GET", url, params=params))[2] == b"hello\n"
        proc.send_signal(stop_signal)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # It let go of the directory: this process can own it now.
    again = EmbeddedClickHouse(data_dir, port=0)
    await again.start()
    await again.stop()


def test_plan_statement_splits_query_from_data():
    # clickhouse-connect's insert: statement and binary rows in one body.
    native = plan_statement({}, {}, b"INSERT INTO t (a, b) FORMAT Native\n\x02\x01\xff")
    assert native.sql == "INSERT INTO t (a, b) "
    assert (native.insert_format, native.data, native.result_format) == (
        "Native",
        b"\x02\x01\xff",
        None,
    )
    csv = plan_statement({"query": "INSERT INTO t FORMAT CSV", "database": "d"}, {}, b"1,2")
    assert (csv.insert_format, csv.data, csv.database) == ("CSV", b"1,2", "d")
    inline = plan_statement({}, {}, b"INSERT INTO t VALUES ('FORMAT CSV\n')")
    assert (inline.sql, inline.insert_format) == ("INSERT INTO t VALUES ('FORMAT CSV\n')", None)
    values = plan_statement({"query": "INSERT INTO t VALUES"}, {}, b"(1)")
    assert (values.sql, values.insert_format) == ("INSERT INTO t VALUES\n(1)", None)
    select = plan_statement(
        {"query": "SELECT {x:UInt8}", "param_x": "1", "max_threads": "2"}, {}, b""
    )
    assert (select.params, select.settings) == ({"x": "1"}, {"max_threads": "2"})
    assert select.result_format == "TabSeparated"
    assert plan_statement({}, {}, b"CREATE TABLE t (a UInt8) ENGINE = Memory").result_format is None


def test_engine_errors_keep_code_and_name():
    error = ClickHouseError.from_engine(
        RuntimeError(
            "Streaming insert finish failed: Code: 27. DB::Exception: Cannot parse input. "
            "(CANNOT_PARSE_INPUT_ASSERTION_FAILED) (version 26.9.2.1)"
        )
    )
    assert (error.code, error.name, error.status) == (
        27,
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        400,
    )
    assert error.body("1.0") == (
        "Code: 27. DB::Exception: Cannot parse input. "
        "(CANNOT_PARSE_INPUT_ASSERTION_FAILED) (version 1.0)\n"
    )
    with pytest.raises(ClickHouseError, match="CANNOT_DECOMPRESS|Cannot decompress"):
        decode_body(b"not gzip", "gzip")
