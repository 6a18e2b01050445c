"""chDB served behind ClickHouse's HTTP interface (`clickhouse.url = "embedded"`).

`chhttp.py` holds the protocol rules; this module holds the lock, the chDB
session, its thread and the aiohttp server. What chDB 4.4 (engine 26.9) is
like, and how this module copes:

- A process hosts one engine at one data path. Sessions on that path can be
  closed and reopened in the same process, but a second path fails until every
  session on the first is closed: two servers on different paths cannot share
  a process.
- chDB locks `<path>/status` against other processes but lets a second session
  in the same process share the engine; the flock taken in `start()` is what
  keeps one owner per data directory inside a process too.
- USE and SET stick to the session across calls. Each request's `database`
  and settings are applied before its statement (only what differs from the
  previous request), giving every request the isolation of a sessionless
  ClickHouse request. A SET sent as a statement sticks, as in a ClickHouse
  HTTP session; a USE sent as a statement lasts for its request.
- Calls block, so they all run on one dedicated thread, one statement at a
  time, and the event loop stays free.
- Data after `FORMAT <name>` (clickhouse-connect's binary Native inserts too)
  goes to chDB's streaming inserter. An empty Native result comes back as zero
  bytes where ClickHouse sends a column header, so one is built from DESCRIBE.
- Bodies are read whole (up to MAX_BODY_BYTES) and results built whole: fine
  for development and tests. GET requests are not forced read-only.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from aiohttp import web
from chdb.session import Session

from pipeline.dev.chhttp import (
    ClickHouseError,
    Statement,
    choose_encoding,
    content_type,
    decode_body,
    encode_body,
    native_header,
    plan_statement,
    set_statement,
    without_format,
)

MAX_BODY_BYTES = 1 << 30
LOCK_NAME = "embedded-clickhouse.lock"
_USE = re.compile(r"\s*USE\b", re.IGNORECASE)
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What the engine produced for one statement: the body and ClickHouse's summary."""

    body: bytes
    summary: dict[str, str]


class _Engine:
    """The chDB session plus the database and settings last applied to it.
    Not thread-safe: every call, including construction, happens on the chDB thread."""

    def __init__(self, path: str):
        self._session = Session(path)
        row = self._session.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = row.decode().rstrip("\n").split("\t")
        self._database: str | None = None  # None: unknown, the next request issues USE
        self._settings: dict[str, str] = {}  # applied on top of the defaults

    def run(self, st: Statement) -> Outcome:
        """Run one statement in its database with its settings; raises chDB's errors."""
        self._prepare(st)
        if st.insert_format is not None:
            # Leaving the block without finish() cancels the insert: nothing half-written.
            with self._session.send_insert(st.sql, st.insert_format) as inserter:
                if st.data:
                    inserter.append(st.data)
                done = inserter.finish()
            written = (done.rows_written, done.bytes_written)
            return Outcome(b"", _summary((0, 0), written, done.elapsed))
        if _USE.match(st.sql):
            self._database = None
        result = self._session.query(st.sql, st.output_format, params=st.params or None)
        body = result.bytes() or b""
        if not body and st.result_format == "Native":  # chDB: zero bytes, not a header
            body = self._empty_native(st)
        read = (result.rows_read(), result.bytes_read())
        written = (result.rows_written(), result.bytes_written())
        return Outcome(body, _summary(read, written, result.elapsed(), len(body)))

    def _empty_native(self, st: Statement) -> bytes:
        """The column header ClickHouse sends for an empty Native result, which
        clickhouse-connect takes column names from."""
        try:
            described = self._session.query(
                f"DESCRIBE ({without_format(st.sql)})", "JSONEachRow", params=st.params or None
            )
        except Exception:  # not a SELECT (SHOW, EXISTS...): zero bytes it is
            return b""
        rows = [json.loads(line) for line in (described.bytes() or b"").splitlines()]
        return native_header([(row["name"], row["type"]) for row in rows])

    def _prepare(self, st: Statement) -> None:
        if st.database != self._database:
            self._database = None
            quoted = "`" + st.database.replace("\\", "\\\\").replace("`", "\\`") + "`"
            self._session.query(f"USE {quoted}", "TabSeparated")
            self._database = st.database
        changes: dict[str, str | None] = {
            k: v for k, v in st.settings.items() if self._settings.get(k) != v
        }
        changes.update({k: None for k in self._settings if k not in st.settings})
        if changes:
            # One SET is all-or-nothing in ClickHouse, so a rejected setting leaves
            # self._settings true.
            self._session.query(set_statement(changes), "TabSeparated")
            self._settings = dict(st.settings)

    def close(self) -> None:
        self._session.close()


class EmbeddedClickHouse:
    """chDB behind ClickHouse's HTTP interface. One process owns the data directory."""

    def __init__(self, path: str | Path, host: str = "127.0.0.1", port: int = 8123):
        self.path = Path(path)
        self.host = host
        self._port = port
        self._lock: IO[str] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._engine: _Engine | None = None
        self._runner: web.AppRunner | None = None
        self._display_name = socket.gethostname()

    @property
    def url(self) -> str:
        """Base URL for clickhouse-connect and curl; the real port once started with 0."""
        return f"http://{self.host}:{self._port}"

    async def start(self) -> None:
        """Lock the data directory, open the chDB session and listen on the running loop.

        Raises RuntimeError naming the path when another owner holds it; on any
        failure everything acquired so far is released again.
        """
        if self._runner is not None:
            raise RuntimeError(f"EmbeddedClickHouse for {self.path} is already started")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_directory(self.path)
        try:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
            # Resolved: chDB compares path strings when a second session opens.
            self._engine = await self._on_engine_thread(_Engine, str(self.path.resolve()))
            app = web.Application(client_max_size=MAX_BODY_BYTES)
            app.router.add_get("/ping", self._ping)
            app.router.add_route("*", "/", self._handle)
            # Bodies are decoded by chhttp, which also knows lz4 and zstd.
            self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self._port).start()
            self._port = self._runner.addresses[0][1]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, close the session and release the lock. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        engine, self._engine = self._engine, None
        if engine is not None:
            await self._on_engine_thread(engine.close)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        lock, self._lock = self._lock, None
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    async def _on_engine_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _handle(self, request: web.Request) -> web.Response:
        query_id = request.query.get("query_id") or str(uuid.uuid4())
        try:
            params, body = await _read_request(request)
            if "query" not in params and not body:
                return web.Response(text="Ok.\n")
            statement = plan_statement(params, request.headers, body)
            assert self._engine is not None
            outcome = await self._on_engine_thread(self._engine.run, statement)
        except ClickHouseError as exc:
            return self._error(exc, query_id)
        except Exception as exc:  # chDB raises RuntimeError subclasses carrying ClickHouse text
            error = ClickHouseError.from_engine(exc)
            if error.name == "STD_EXCEPTION":  # not from the engine: keep the traceback
                log.exception("unexpected error serving query %s", query_id)
            return self._error(error, query_id)
        headers = self._headers(query_id, content_type(statement.result_format))
        headers["X-ClickHouse-Summary"] = json.dumps(outcome.summary)
        if statement.result_format is not None:
            headers["X-ClickHouse-Format"] = statement.result_format
        body = outcome.body
        # Like ClickHouse, compress only when asked to by setting and by header.
        method = choose_encoding(request.headers.get("Accept-Encoding"))
        if body and method and params.get("enable_http_compression") == "1":
            body = await asyncio.to_thread(encode_body, body, method)
            headers["Content-Encoding"] = method
        return web.Response(body=body, headers=headers)

    def _headers(self, query_id: str, ctype: str) -> dict[str, str]:
        assert self._engine is not None
        return {
            "Content-Type": ctype,
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self._engine.timezone,
            "X-ClickHouse-Server-Display-Name": self._display_name,
        }

    def _error(self, exc: ClickHouseError, query_id: str) -> web.Response:
        version = self._engine.version if self._engine is not None else "unknown"
        headers = self._headers(query_id, content_type(None)) if self._engine else {}
        headers["X-ClickHouse-Exception-Code"] = str(exc.code)
        return web.Response(status=exc.status, text=exc.body(version), headers=headers)


async def _read_request(request: web.Request) -> tuple[dict[str, str], bytes]:
    """URL parameters (plus multipart form fields, which clickhouse-connect uses for
    large bind parameters) and the decoded body."""
    params = dict(request.query)
    if request.content_type.startswith("multipart/form-data"):
        for name, value in (await request.post()).items():
            if not isinstance(value, str):
                message = "External data tables are not supported"
                raise ClickHouseError(48, "NOT_IMPLEMENTED", message)
            params[name] = value
        return params, b""
    raw, encoding = await request.read(), request.headers.get("Content-Encoding")
    # Off the loop: decompressing a large insert would stall every other request.
    return params, await asyncio.to_thread(decode_body, raw, encoding) if encoding else raw


def _summary(
    read: tuple[int, int], written: tuple[int, int], elapsed_s: float, result_bytes: int = 0
) -> dict[str, str]:
    """X-ClickHouse-Summary, whose numbers ClickHouse sends as strings."""
    names = "read_rows read_bytes written_rows written_bytes result_bytes elapsed_ns".split()
    values = (*read, *written, result_bytes, int(elapsed_s * 1e9))
    return dict(zip(names, map(str, values), strict=True))


def _lock_directory(path: Path) -> IO[str]:
    """Take an exclusive, non-blocking flock on `<path>/embedded-clickhouse.lock`.
    flock is per open file, so a second owner in this same process is refused too."""
    lock_path = path / LOCK_NAME
    handle = open(lock_path, "a+")  # noqa: SIM115 - held open until stop()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RuntimeError(
            f"ClickHouse data directory {path} is already owned by another embedded server "
            f"(pid {holder} holds {lock_path})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


async def _serve(server: EmbeddedClickHouse) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"embedded ClickHouse serving {server.path} at {server.url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve a data directory until SIGINT or SIGTERM, then close it cleanly."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dev.clickhouse",
        description="Serve chDB behind ClickHouse's HTTP interface.",
    )
    parser.add_argument("--path", required=True, help="data directory (created if missing)")
    parser.add_argument("--listen", default="127.0.0.1:8123", help="HOST:PORT, port 0 picks one")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        parser.error(f"--listen wants HOST:PORT, got {args.listen!r}")
    try:
        asyncio.run(_serve(EmbeddedClickHouse(args.path, host or "127.0.0.1", int(port))))
    except RuntimeError as exc:  # e.g. the directory has an owner already
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
