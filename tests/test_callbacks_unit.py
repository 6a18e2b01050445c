"""Pure parts of the callbacks service: requests, signatures, delivery rules, SSRF rule,
offset tracking. No broker, no network (the resolver test only asks the local resolver)."""

import json
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest
from standardwebhooks import Webhook

from pipeline import codec
from pipeline.callbacks.deliver import GuardedResolver, classify_error
from pipeline.callbacks.offsets import Tracker
from pipeline.config import CALLBACK_MACROS, Publisher
from pipeline.core import callback as request
from pipeline.core import callback as tasks
from pipeline.core import delivery as policy
from pipeline.core import ssrf

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ALL_MACROS = "&".join(f"{name}={{{name}}}" for name in sorted(CALLBACK_MACROS))


def conversion(**overrides):
    c = codec.CONVERSION.from_json(
        json.loads((codec.SCHEMA_DIR / "examples/conversion/install-attributed.json").read_text())
    )
    c.update(overrides)
    return c


def publisher(url=f"https://net1.example/cb?{ALL_MACROS}", **kw):
    return Publisher(id="net1", postback_url=url, events=frozenset({"install", "purchase"}), **kw)


def test_which_conversions_get_a_callback():
    pubs = {"net1": publisher()}
    assert tasks.wants_callback(conversion(), pubs)
    assert not tasks.wants_callback(conversion(status="duplicate"), pubs)
    assert not tasks.wants_callback(conversion(event="level_up"), pubs)
    assert not tasks.wants_callback(conversion(pub="nobody"), pubs)


def test_every_macro_filled_percent_encoded():
    task = tasks.from_conversion(conversion(sub1="a b&c=d/é", sub5="z"))
    req = request.build(publisher(), task, now_s=1_800_000_000)
    assert req.method == "GET" and req.body == b""
    assert "{" not in req.url and "}" not in req.url
    query = parse_qs(urlsplit(req.url).query, keep_blank_values=True)
    assert set(query) == CALLBACK_MACROS
    assert query["sub1"] == ["a b&c=d/é"]  # percent-encoded, so it decodes back intact
    assert "sub1=a%20b%26c%3Dd%2F%C3%A9" in req.url
    assert query["conversion_id"] == ["019a5c3e8f6b7c2d9e0f1a2b3c4d5e6f"]
    assert query["click_id"] == ["AZq7xJkAsC3vYcT0ZPbyJkzzgpOq2yr7C0tB"]
    assert query["campaign_id"] == ["c1"] and query["pub"] == ["net1"]
    assert query["event"] == ["install"] and query["currency"] == ["USD"]
    assert query["revenue"] == ["3.00"] and query["payout"] == ["2.00"]
    assert query["ctit"] == ["60"]
    assert query["click_ts"] == ["1795637791"] and query["conversion_ts"] == ["1795637851"]
    assert query["txn_id"] == [""]  # none sent: empty, never a literal macro
    assert req.headers["Idempotency-Key"] == task["conversion_id"]
    assert "webhook-signature" not in req.headers


def test_in_app_event_has_empty_ctit_and_its_txn_id():
    task = tasks.from_conversion(
        conversion(event="purchase", txn_id="o 1", ctit_seconds=None, payout=Decimal("1.998"))
    )
    query = parse_qs(
        urlsplit(request.build(publisher(), task, 0).url).query, keep_blank_values=True
    )
    assert query["ctit"] == [""] and query["txn_id"] == ["o 1"] and query["payout"] == ["1.998"]


@pytest.mark.parametrize(
    "value,text",
    [
        ("2", "2.00"),
        ("2.000000", "2.00"),
        ("1.998000", "1.998"),
        ("10", "10.00"),
        ("0", "0.00"),
        ("0.000001", "0.000001"),
        ("123456.5", "123456.50"),
    ],
)
def test_money_format(value, text):
    assert tasks.money(Decimal(value)) == text


def test_post_sends_the_same_fields_as_json_and_is_verifiable():
    pub = publisher("https://net1.example/hook", method="POST", signing_secret=SECRET)
    task = tasks.from_conversion(conversion(txn_id=None))
    now = int(datetime.now(UTC).timestamp())
    req = request.build(pub, task, now_s=now)
    body = json.loads(req.body)
    assert set(body) == CALLBACK_MACROS
    assert body == {**tasks.fields(task)} and body["revenue"] == "3.00" and body["ctit"] == 60
    assert body["txn_id"] is None
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["webhook-id"] == req.headers["Idempotency-Key"] == task["conversion_id"]
    assert req.headers["webhook-timestamp"] == str(now)
    # the specification's reference implementation accepts it
    assert Webhook(SECRET).verify(req.body, req.headers) == body
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "QUJD" * 8).verify(req.body, req.headers)
    tampered = req.body.replace(b"3.00", b"9.00")
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(tampered, req.headers)


def test_get_is_signed_over_an_empty_body():
    req = request.build(
        publisher(signing_secret=SECRET),
        tasks.from_conversion(conversion()),
        int(datetime.now(UTC).timestamp()),
    )
    Webhook(SECRET).verify(b"", req.headers, json_parse=False)


def test_same_task_same_request_but_fresh_timestamp():
    pub = publisher(method="POST", signing_secret=SECRET)
    task = tasks.from_conversion(conversion())
    a, b = request.build(pub, task, 1000), request.build(pub, {**task, "attempt": 3}, 2000)
    assert (a.url, a.body, a.headers["Idempotency-Key"]) == (
        b.url,
        b.body,
        b.headers["Idempotency-Key"],
    )
    assert a.headers["webhook-signature"] != b.headers["webhook-signature"]


def test_signature_known_answer():
    # computed independently: HMAC-SHA256 over "msg_1.1614265330.{}" with the decoded key
    headers = request.signature_headers(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_1", 1614265330, b"{}"
    )
    expected = Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").sign(
        "msg_1", datetime.fromtimestamp(1614265330, UTC), "{}"
    )
    assert headers["webhook-signature"] == expected


@pytest.mark.parametrize(
    "url,secrets,shown",
    [
        (
            "https://a.example/cb?click=1&token=abc&x=2",
            (),
            "https://a.example/cb?click=1&token=***&x=2",
        ),
        (
            "https://a.example/cb?API_KEY=k1&Sig=s&auth=t",
            (),
            "https://a.example/cb?API_KEY=***&Sig=***&auth=***",
        ),
        ("https://u:pw@a.example/cb?c=1", (), "https://u:***@a.example/cb?c=1"),
        ("https://u@a.example/cb", (), "https://u@a.example/cb"),
        (
            "https://a.example/cb?s=whsec_abc&t=abc",
            ("whsec_abc",),
            "https://a.example/cb?s=***&t=***",
        ),
        ("https://a.example/cb?password=&c=%20", (), "https://a.example/cb?password=&c=%20"),
        ("https://a.example/cb", (), "https://a.example/cb"),
    ],
)
def test_redacted_url(url, secrets, shown):
    assert request.redact_url(url, secrets) == shown


@pytest.mark.parametrize(
    "status,kind",
    [
        (200, "delivered"),
        (201, "delivered"),
        (204, "delivered"),
        (299, "delivered"),
        (301, "permanent"),
        (302, "permanent"),
        (307, "permanent"),
        (308, "permanent"),
        (400, "permanent"),
        (401, "permanent"),
        (403, "permanent"),
        (404, "permanent"),
        (410, "permanent"),
        (422, "permanent"),
        (408, "retryable"),
        (429, "retryable"),
        (500, "retryable"),
        (502, "retryable"),
        (503, "retryable"),
        (504, "retryable"),
    ],
)
def test_status_classification(status, kind):
    assert policy.classify_status(status)[0] == kind


def test_error_classification():
    import aiohttp

    assert classify_error(TimeoutError(), 10) == ("retryable", "timeout after 10s")
    assert classify_error(ConnectionRefusedError(111, "refused"), 1)[0] == "retryable"
    assert classify_error(aiohttp.ServerDisconnectedError(), 1)[0] == "retryable"
    assert classify_error(ssrf.Blocked("10.0.0.1 is a private address"), 1)[0] == "blocked"
    assert classify_error(aiohttp.InvalidURL("x"), 1)[0] == "permanent"
    # whatever else one request raises is that callback's failure, not the service's
    assert classify_error(ValueError("backslash in authority"), 1) == (
        "permanent",
        "ValueError: backslash in authority",
    )


async def test_a_url_the_client_cannot_send_fails_that_callback_only():
    from pipeline.callbacks.deliver import Deliverer
    from pipeline.core.callback import Request

    deliverer = Deliverer(timeout=2, allow_private_networks=False)
    await deliverer.start()
    try:
        bad = Request("GET", "http://127.0.0.1:28099\\@vm:28099/x", {}, b"")
        attempt = await deliverer.send(bad, bad.url)
        assert attempt.kind == "permanent" and "backslash" in attempt.error
        for host in ("127.1", "2130706433", "0177.0.0.1", "127.0.0.1."):
            literal = Request("GET", f"http://{host}:9/x", {}, b"")
            attempt = await deliverer.send(literal, literal.url)
            assert attempt.kind == "blocked", (host, attempt)
    finally:
        await deliverer.close()


def attempt(kind, status=None, error="HTTP 500"):
    return policy.Attempt(kind, status, error, started_ms=5_000, duration_ms=12, url="u")


SCHEDULE = (0.2, 0.4, 0.8)


def test_steps_through_a_retry_schedule_to_the_dead_letter():
    task = tasks.from_conversion(conversion())
    seen = []
    for n in range(1, 5):
        step = policy.step(task, attempt("retryable", 500), SCHEDULE, now_ms=10_000)
        seen.append(step.record["outcome"])
        assert step.record["attempt"] == n and step.record["status_code"] == 500
        if n < 4:
            assert step.retry == n and step.dead is None
            assert step.task["attempt"] == n + 1
            assert step.task["not_before_ms"] == 10_000 + SCHEDULE[n - 1] * 1000
            task = step.task
        else:
            assert step.task is None and step.dead["last_outcome"] == "failed"
            assert "gave up after 3 retries" in step.record["error"]
    assert seen == ["retry", "retry", "retry", "failed"]
    replayed = policy.replayed(step.dead, now_ms=20_000)
    assert (replayed["attempt"], replayed["retry"], replayed["not_before_ms"]) == (5, 0, 20_000)


@pytest.mark.parametrize(
    "kind,outcome,dead",
    [
        ("delivered", "delivered", False),
        ("permanent", "failed", True),
        ("blocked", "blocked", True),
    ],
)
def test_no_retry_for_final_outcomes(kind, outcome, dead):
    step = policy.step(tasks.from_conversion(conversion()), attempt(kind), SCHEDULE, 0)
    assert step.record["outcome"] == outcome and step.task is None
    assert (step.dead is not None) == dead


def test_no_schedule_means_one_attempt():
    step = policy.step(tasks.from_conversion(conversion()), attempt("retryable"), (), 0)
    assert step.record["outcome"] == "failed" and step.dead is not None


def test_deferral_uses_no_attempt():
    task = tasks.from_conversion(conversion())
    parked = policy.deferred(task, 1_000, 0.2)
    assert (parked["attempt"], parked["retry"], parked["deferrals"]) == (1, 0, 1)
    assert parked["not_before_ms"] == 1_200


def test_task_and_attempt_records_fit_their_schemas():
    task = tasks.from_conversion(conversion())
    step = policy.step(task, attempt("retryable", None, "timeout after 1s"), SCHEDULE, 0)
    for c, record in [(codec.CALLBACK_TASK, step.task), (codec.CALLBACK, step.record)]:
        assert c.decode(c.encode(record)) == record


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "192.168.255.255",
        "169.254.169.254",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "::ffff:169.254.169.254",
        "0.0.0.0",
        "::",
        "fe80::1",
        "fc00::1",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "100.64.0.1",
        "2002:7f00:1::1",
        "fe80::1%eth0",
    ],
)
def test_refused_addresses(address):
    assert ssrf.refusal(address)
    with pytest.raises(ssrf.Blocked):
        ssrf.check(address, [address])


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "172.32.0.1", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address):
    assert ssrf.refusal(address) is None


def test_reasons_name_the_kind():
    assert ssrf.refusal("::ffff:127.0.0.1") == "IPv4-mapped 127.0.0.1 is a loopback address"
    assert ssrf.refusal("169.254.169.254") == "169.254.169.254 is a link-local address"
    with pytest.raises(ssrf.Blocked, match="metadata.internal: 10.0.0.7 is a private address"):
        ssrf.check("metadata.internal", ["93.184.215.14", "10.0.0.7"])  # any bad answer blocks


async def test_a_name_resolving_to_a_private_address_is_blocked():
    resolver = GuardedResolver()
    with pytest.raises(ssrf.Blocked, match="localhost: .* loopback"):
        await resolver.resolve("localhost", 80)


def test_tracker_commits_below_the_lowest_unfinished_offset():
    t = Tracker()
    assert t.commit_offset() is None
    for offset in (10, 11, 12):
        t.start(offset)
    t.skip(13)
    assert t.commit_offset() == 10
    t.finish(12)
    t.finish(11)
    assert t.commit_offset() == 10  # 10 still running: 11 and 12 must wait
    t.finish(10)
    assert t.commit_offset() == 14
    t.committed = 14
    assert t.commit_offset() is None
    t.start(14)
    t.rewind(15)  # 15 was not due: read again later
    t.finish(14)
    assert t.commit_offset() == 15 and t.in_flight == 0


class _Consumer:
    """What the service's flow control asks of aiokafka's consumer."""

    def __init__(self, tps):
        self.tps, self.paused_tps, self.polled = set(tps), set(), {}

    def assignment(self):
        return set(self.tps)

    def paused(self):
        return set(self.paused_tps)

    def pause(self, *tps):
        self.paused_tps.update(tps)

    def resume(self, *tps):
        self.paused_tps.difference_update(tps)

    def last_poll_timestamp(self, tp):
        return self.polled.get(tp)


def test_retry_topics_rest_between_reads(monkeypatch):
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from pipeline.callbacks import reader as module
    from tests.callbacks_support import callbacks_config, settings_from

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(module, "now_ms", lambda: int(clock.now * 1000))
    settings = settings_from(
        callbacks_config("127.0.0.1:9", "http://127.0.0.1:9", "", retry_schedule='["5s", "1m"]')
    )
    from pipeline.callbacks import app

    service = app.build(settings)
    assert service.rest == 1.0  # a fifth of 5 s, at most a second
    conversions = TopicPartition(settings.topic("conversions"), 0)
    retry1 = TopicPartition(settings.topic("callbacks-retry-1"), 0)
    retry2 = TopicPartition(settings.topic("callbacks-retry-2"), 0)
    consumer = service.consumer = _Consumer([conversions, retry1, retry2])

    def step(seconds=0.0):
        clock.now += seconds
        assert service._flow_control()  # the conversions are read throughout
        return consumer.paused()

    assert step() == {retry1, retry2}  # resting since the service began
    assert 1 <= service._poll_ms() <= 1001  # looks again when the rest is over
    assert step(1.0) == set()  # read: resumed ...
    assert step(0.5) == set()  # ... until the broker answered a fetch for each
    consumer.polled[retry1] = int(clock.now * 1000)
    assert step() == set()
    consumer.polled[retry2] = int(clock.now * 1000)
    assert step() == {retry1, retry2}  # rest again
    assert step(0.9) == {retry1, retry2}

    # a read that brought records reads on, without a rest
    assert step(0.1) == set()
    service.retries_brought = True
    consumer.polled = {retry1: int(clock.now * 1000), retry2: int(clock.now * 1000)}
    assert step(0.01) == set()
    consumer.polled = {retry1: int(clock.now * 1000), retry2: int(clock.now * 1000)}
    assert step(0.01) == {retry1, retry2}

    # a partition paused until its head is due does not hold the read open
    service.delayed[retry2] = int((clock.now + 60) * 1000)
    assert step(1.0) == {retry2}
    consumer.polled[retry1] = int(clock.now * 1000)
    assert step() == {retry1, retry2}


# --- reversal callbacks ------------------------------------------------------------------


def adjustment(name="reversal-applied-after-refund", **overrides):
    path = codec.SCHEMA_DIR / f"examples/adjustment/{name}.json"
    a = codec.ADJUSTMENT.from_json(json.loads(path.read_text()))
    a.update(overrides)
    return a


def test_which_adjustments_get_a_callback():
    listening = {"net1": Publisher("net1", "https://net1.example/cb", frozenset({"reversal"}))}
    deaf = {"net1": publisher()}
    assert tasks.wants_reversal_callback(adjustment(), listening)
    assert tasks.wants_reversal_callback(adjustment("refund-applied"), listening)
    assert not tasks.wants_reversal_callback(adjustment(), deaf)  # events lack "reversal"
    assert not tasks.wants_reversal_callback(adjustment(pub="nobody"), listening)
    for name in ("already-reversed", "exceeds-revenue", "not-attributed", "unknown-conversion"):
        assert not tasks.wants_reversal_callback(adjustment(name), listening), name


def test_reversal_callback_sends_the_negative_deltas_and_its_own_key():
    a = adjustment()
    task = tasks.from_adjustment(a)
    assert codec.CALLBACK_TASK.decode(codec.CALLBACK_TASK.encode(task)) == task
    pub = publisher("https://net1.example/hook", method="POST", signing_secret=SECRET)
    req = request.build(pub, task, now_s=int(datetime.now(UTC).timestamp()))
    body = json.loads(req.body)
    assert set(body) == CALLBACK_MACROS
    assert (body["status"], body["reason"]) == ("reversed", "reversal")
    assert (body["revenue"], body["payout"]) == ("-14.99", "-2.998")
    assert body["conversion_id"] == a["conversion_id"] and body["event"] == "purchase"
    assert body["click_id"] == a["click_id"] and body["sub1"] == "s1-abc"
    assert body["txn_id"] == "order-8812" and body["ctit"] is None
    key = a["adjustment_id"]
    assert req.headers["Idempotency-Key"] == req.headers["webhook-id"] == key != a["conversion_id"]
    Webhook(SECRET).verify(req.body, req.headers)
    refund = tasks.from_adjustment(adjustment("refund-applied"))
    query = parse_qs(urlsplit(request.build(publisher(), refund, 0).url).query)
    assert (query["status"], query["reason"], query["payout"]) == (
        ["reversed"],
        ["refund"],
        ["-1.00"],
    )
    # its attempts are its own rows: (pub, adjustment_id, attempt), and its Kafka key
    step = policy.step(task, attempt("delivered", 200, ""), SCHEDULE, 0)
    assert step.record["conversion_id"] == key == tasks.callback_id(task)
    assert codec.CALLBACK.decode(codec.CALLBACK.encode(step.record)) == step.record


def test_status_and_reason_are_empty_for_an_attributed_conversion():
    task = tasks.from_conversion(conversion())
    assert (task["status"], task["reason"], task["adjustment_id"]) == ("", "", None)
    assert tasks.callback_id(task) == task["conversion_id"]
    query = parse_qs(
        urlsplit(request.build(publisher(), task, 0).url).query, keep_blank_values=True
    )
    assert query["status"] == [""] and query["reason"] == [""]


def test_seen_skips_a_record_read_again_elsewhere_and_redoes_one_read_again_in_place():
    from pipeline.callbacks.seen import Seen

    seen = Seen(size=2)
    assert seen.first(("conversion", "a", "attributed"), ("t", 0, 5))
    # the worker's replay: the same conversion at a later offset
    assert not seen.first(("conversion", "a", "attributed"), ("t", 0, 9))
    # a job dropped by a rebalance and read again at its own offset is done again
    assert seen.first(("conversion", "a", "attributed"), ("t", 0, 5))
    # another status of the same conversion (a reversal) is another callback
    assert seen.first(("conversion", "a", "reversed"), ("t", 0, 11))
    assert seen.first(("skan", "s1"), ("s", 1, 3))  # bounded: the oldest is forgotten
    assert len(seen) == 2
    assert seen.first(("conversion", "a", "attributed"), ("t", 0, 9))
