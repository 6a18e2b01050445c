"""The ingress under generated and hostile input, as `pipeline ingress` runs (a
process, its log captured) with a sink, on Tansu and the embedded ClickHouse:
requests schemathesis generates from deploy/openapi.yaml (valid and invalid
ones), then a raw-socket fuzzer (split and slow bodies, invalid UTF-8, deep
JSON, huge headers, bad request lines), each for a bounded count. Asserted: no
answer is a 5xx, every /postback request answered is a row in `postbacks`, and
no configured secret is in a row or in the ingress's or the sink's log."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from pipeline.dev.kafka import free_port, wait_for_port
from pipeline.sink import migrations as ddl

from .conftest import write_config
from .stack import start_component, stop_component

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "deploy" / "openapi.yaml").read_text())
TOKEN, CLICK_SECRET = "adv-secret", "dev-secret-change-me"
EXAMPLES = 60  # per operation and generation mode
RAW_CASES = 120
PB = "/postback"
SKAN = "/.well-known/skadnetwork/report-attribution/"


@pytest.fixture
def live(tansu, clickhouse_url, tmp_path):
    port = free_port()
    path, settings = write_config(
        tmp_path, tansu, clickhouse_url, ingress=f'listen = "127.0.0.1:{port}"'
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("ingress", "sink")}
    procs = [start_component(name, path, logs[name]) for name in ("sink", "ingress")]
    try:
        wait_for_port("127.0.0.1", port, 60, procs[1])
        yield f"http://127.0.0.1:{port}", port, settings, logs
    finally:
        for proc in procs:
            stop_component(proc)


class Tally:
    def __init__(self):
        self.statuses: list[tuple[int, str]] = []
        self.postbacks = 0  # /postback requests answered
        self.refused: list[str] = []  # generated requests the client would not send

    def add(self, status: int, target: str) -> None:
        self.statuses.append((status, target))
        if target.split("?", 1)[0] == "/postback":
            self.postbacks += 1


def schemathesis_run(base: str, tally: Tally) -> set[tuple[str, str, str]]:
    """Generate and send requests for every operation; the (method, path, mode) run
    (an operation without parameters has no invalid requests to generate)."""
    schema = schemathesis.openapi.from_dict(SPEC)
    http = requests.Session()
    ran = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            path = operation.path

            @given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis_settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                try:
                    response = case.call(base_url=base, session=http, timeout=30)
                except (requests.exceptions.InvalidHeader, ValueError, UnicodeError) as e:
                    tally.refused.append(type(e).__name__)
                    return  # the client refused to send it
                tally.add(response.status_code, path)  # noqa: B023 - called right below
                assert response.status_code < 500, (case.method, case.path, response.text)

            try:
                run()
            except Unsatisfiable:
                continue
            ran.add((operation.method.upper(), path, mode.value))
    return ran


def raw_cases(port: int, rng: random.Random) -> list[tuple[list[bytes], str]]:
    """(parts sent one after the other, the target) of hostile requests."""
    form = f"token={TOKEN}&click_id=x&event=install".encode()
    doc = json.dumps({"token": TOKEN, "click_id": "x", "event": "install"}).encode()
    bad_utf8 = b"token=\xff\xfe&click_id=\xc3\x28"
    deep = b'{"token": "' + TOKEN.encode() + b'", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"

    def post(body: bytes, ctype="application/x-www-form-urlencoded", extra=b"", path=PB):
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n".encode()
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n"
            + extra
        ) + b"\r\n"

    fixed = [
        ([post(form), form[:7], form[7:]], "/postback"),
        (
            [post(doc, "application/json"), *(doc[i : i + 5] for i in range(0, len(doc), 5))],
            "/postback",
        ),
        ([post(doc, "text/plain") + doc], "/postback"),
        ([post(bad_utf8) + bad_utf8], PB),
        ([post(deep, "application/json") + deep], "/postback"),
        ([post(b"x" * 70000) + b"x" * 70000], "/postback"),
        ([post(form, extra=b"X-Big: " + b"h" * 10000 + b"\r\n") + form], "/postback"),
        ([post(form, extra=b"X-Forwarded-For: \xff\xfe\r\n") + form], "/postback"),
        ([f"GET /postback?token={TOKEN} HTTP/1.1 junk\r\n\r\n".encode()], "/postback"),
        ([f"GET /postback?token={TOKEN}&x={'a' * 9000} HTTP/1.1\r\n\r\n".encode()], "/postback"),
        ([f"GET /postback?token={TOKEN} HTTP/1.1\r\nNo Colon\r\n\r\n".encode()], "/postback"),
        ([f"G\x00T /postback?token={TOKEN} HTTP/1.1\r\n\r\n".encode()], "/postback"),
        (
            [
                f"POST /postback?token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
                "Transfer-Encoding: chunked\r\n\r\n5\r\ntoken\r\nzz\r\n".encode()
            ],
            "/postback",
        ),
        ([b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(40))], ""),
        ([b"GET /click/c1?pub=net1&sub1=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n"], "/click/c1"),
        ([b"GET /%ff%00/../.. HTTP/1.1\r\nHost: x\r\n\r\n"], "/%ff%00/../.."),
        ([b"GET / HTTP/9.9\r\n\r\n"], ""),
        # SKAdNetwork postbacks: split, not JSON, invalid UTF-8, deep, too large
        (
            [post(doc, "application/json", path=SKAN), doc[:9], doc[9:]],
            SKAN,
        ),
        ([post(b"{}", "application/json", path=SKAN) + b"{}"], SKAN),
        ([post(b"[1, 2]", "text/plain", path=SKAN) + b"[1, 2]"], SKAN),
        ([post(bad_utf8, "application/json", path=SKAN) + bad_utf8], SKAN),
        ([post(deep, "application/json", path=SKAN) + deep], SKAN),
        ([post(b"{" * 70000, "application/json", path=SKAN) + b"{" * 70000], SKAN),
        (
            [post(doc, extra=b"X-Forwarded-For: \xff\xfe\r\n", path=SKAN) + doc],
            SKAN,
        ),
    ]
    out = list(fixed)
    alphabet = [b"token=", TOKEN.encode(), b"&", b"=", b"%", b"\xff", b"\x00", b"{", b'"', b"\r\n"]
    while len(out) < RAW_CASES:
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        ctype = rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])
        head = post(body, ctype)
        cut = rng.randrange(1, len(body) + 1)
        out.append(([head, body[:cut], body[cut:]], "/postback"))
    return out


def send_raw(port: int, parts: list[bytes], pause: float) -> int | None:
    """Send the parts, `pause` apart; the answer's status (None: no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            for part in parts:
                if part:
                    sock.sendall(part)
                    time.sleep(pause)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before the rest went out
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def test_generated_and_hostile_requests(live):
    base, port, settings, logs = live
    tally = Tally()
    ran = schemathesis_run(base, tally)
    for method, path in (("GET", PB), ("POST", PB), ("POST", SKAN)):
        for mode in ("positive", "negative"):
            assert (method, path, mode) in ran
    rng = random.Random(20)
    for i, (parts, target) in enumerate(raw_cases(port, rng)):
        status = send_raw(port, parts, pause=0.2 if i < 3 else 0)  # the first ones slowly
        if status is not None:
            tally.add(status, target)
    answered, unsent = len(tally.statuses), len(tally.refused)
    print(f"{answered} answered, {tally.postbacks} to /postback, {unsent} unsent")
    server_errors = [s for s in tally.statuses if s[0] >= 500 and s[0] != 503]
    assert server_errors == []
    assert [s for s in tally.statuses if s[0] == 503] == []  # Kafka was up all along
    ch = ddl.connect(settings.clickhouse_url)
    db = settings.clickhouse_database
    deadline = time.monotonic() + 90
    count = 0
    while time.monotonic() < deadline:
        try:
            count = ch.command(f"SELECT count() FROM {db}.postbacks FINAL")
        except Exception:  # noqa: BLE001 - the sink may not have created it yet
            count = 0
        if count >= tally.postbacks:
            break
        time.sleep(0.5)
    rows = ch.query(f"SELECT * FROM {db}.postbacks FINAL").result_rows
    ch.close()
    assert len(rows) >= tally.postbacks > 100, (len(rows), tally.postbacks)
    stored = json.dumps(rows, default=str)
    assert TOKEN not in stored and CLICK_SECRET not in stored
    for name, log in logs.items():
        text = log.read_text(errors="replace")
        assert TOKEN not in text and CLICK_SECRET not in text, name
        assert "Traceback" not in text, (name, text[-3000:])
