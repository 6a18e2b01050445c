"""SKAdNetwork from the config to the forward, without a broker: `[skan]` and the
advertisers' keys validated at start-up, test keys beside Apple's, the reports the
ingress makes, the worker's dedup stage over plain mappings, and the forward the
callbacks service sends."""

import base64
import copy
import json
import time
import tomllib
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from standardwebhooks import Webhook

from pipeline import codec, config
from pipeline.core import callback, delivery, skan
from pipeline.worker.skan import SkanStage

from .conftest import EXAMPLE_CONFIG
from .test_skan_core import APPLE_V3_LOSS, APPLE_V3_WIN, P192, P256, TEST_KEYS, V4
from .test_skan_core import sign as signed

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _private_b64(key) -> str:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return base64.b64encode(der).decode()


def example() -> dict:
    return tomllib.loads(EXAMPLE_CONFIG.read_text())


def parse(doc: dict) -> config.Settings:
    return config.parse(doc)


# --- [skan] and the advertisers' keys in the config -------------------------------------


def test_the_example_config_has_a_working_skan_section():
    settings = config.load(EXAMPLE_CONFIG)
    assert settings.skan.ad_network_ids == {"example123.skadnetwork"}
    assert set(settings.skan.test_signers) == {"p192", "p256"}
    assert settings.skan.dedup_retention_s == 60 * 86400
    # the example's test keys are the test suite's: a postback it signs verifies
    assert settings.skan.keys["p256"] == (skan.APPLE_KEYS["p256"], TEST_KEYS["p256"])
    signed = skan.sign(V4, settings.skan.test_signers["p256"])
    assert skan.verify(signed, settings.skan.keys) and skan.verify(signed, TEST_KEYS)
    assert settings.advertisers["acme"].skan_forward_url == "http://127.0.0.1:9999/skan"


def test_test_keys_are_accepted_besides_apples():
    doc = example()
    doc["skan"]["test_keys"] = {"p256": TEST_KEYS["p256"]}  # a public key: verify only
    cfg = parse(doc).skan
    assert cfg.test_signers == {}
    assert skan.verify(APPLE_V3_WIN, cfg.keys) and skan.verify(signed(V4), cfg.keys)
    del doc["skan"]["test_keys"]
    apple_only = parse(doc).skan
    assert skan.verify(APPLE_V3_WIN, apple_only.keys)
    assert not skan.verify(signed(V4), apple_only.keys)


def test_sign_makes_what_verify_accepts():
    for key, postback in ((P256, V4), (P192, {**V4, "version": "2.0", "campaign-id": 7})):
        signed = skan.sign(postback, _private_b64(key))
        assert skan.verify(signed, TEST_KEYS)
        assert not skan.verify({**signed, "transaction-id": "other"}, TEST_KEYS)


def _other_curve_key() -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return _private_b64(key)


@pytest.mark.parametrize(
    "skan_table,key",
    [
        ({"test_keys": {"p384": TEST_KEYS["p256"]}}, "skan.test_keys.p384"),
        ({"test_keys": {"p256": "not base64!"}}, "skan.test_keys.p256"),
        ({"test_keys": {"p256": ""}}, "skan.test_keys.p256"),
        ({"test_keys": {"p256": 5}}, "skan.test_keys.p256"),
        ({"test_keys": {"p256": base64.b64encode(b"junk").decode()}}, "skan.test_keys.p256"),
        ({"test_keys": {"p256": TEST_KEYS["p192"]}}, "skan.test_keys.p256"),  # wrong curve
        ({"test_keys": {"p192": _private_b64(P256)}}, "skan.test_keys.p192"),
        ({"test_keys": {"p256": _other_curve_key()}}, "skan.test_keys.p256"),
        ({"test_keys": "key"}, "skan.test_keys"),
        ({"dedup_retention": "forever"}, "skan.dedup_retention"),
        ({"dedup_retention": "0s"}, "skan.dedup_retention"),
        ({"dedup_retention": 60}, "skan.dedup_retention"),
        ({"ad_network_ids": ["com.example"]}, "skan.ad_network_ids[0]"),
        (
            {"sources": [{"id": "12", "campaign": "nope", "pub": "net1"}]},
            "skan.sources[0].campaign",
        ),
        ({"sources": [{"id": "12", "campaign": "c1", "pub": "nope"}]}, "skan.sources[0].pub"),
        ({"unknown": 1}, "skan.unknown"),
    ],
)
def test_skan_errors_stop_start_up_naming_the_key(skan_table, key):
    doc = example()
    doc["skan"] = {**doc["skan"], **skan_table}
    with pytest.raises(config.ConfigError) as e:
        parse(doc)
    assert e.value.key == key, str(e.value)


@pytest.mark.parametrize(
    "advertiser,key",
    [
        ({"skan_forward_url": "ftp://acme.example/skan"}, "skan_forward_url"),
        ({"skan_forward_url": "https://acme.example/skan?app={app_id}"}, "skan_forward_url"),
        ({"skan_forward_url": "http://0x7f.1/skan"}, "skan_forward_url"),
        ({"skan_forward_url": "http://[::1/skan"}, "skan_forward_url"),
        ({"skan_forward_url": 5}, "skan_forward_url"),
        ({"signing_secret": "not-whsec"}, "signing_secret"),
    ],
)
def test_advertiser_forward_keys_are_checked(advertiser, key):
    doc = example()
    doc["advertisers"][0].update(advertiser)
    with pytest.raises(config.ConfigError) as e:
        parse(doc)
    assert e.value.key == f"advertisers[0].{key}", str(e.value)


def test_without_skan_nothing_is_ours():
    doc = example()
    del doc["skan"]
    settings = parse(doc)
    result = skan.evaluate(json.dumps(APPLE_V3_WIN).encode(), settings.skan)
    assert result["outcome"] == "wrong_ad_network"


# --- the reports the ingress makes --------------------------------------------------------


def test_reports_and_their_keys():
    body = json.dumps(APPLE_V3_WIN).encode()
    report, key = skan.report("a" * 32, 5, "203.0.113.9", body, 65536)
    assert key == APPLE_V3_WIN["transaction-id"].encode()
    assert (report["body"], report["outcome"], report["spooled"]) == (body.decode(), "", False)
    assert codec.SKAN_REPORT.decode(codec.SKAN_REPORT.encode(report)) == report
    # no transaction-id, or not an object: keyed by the skan_id
    assert skan.report("b" * 32, 5, "", b"{}", 65536)[1] == b"b" * 32
    refused, key = skan.report("c" * 32, 5, "", b"[1]", 65536)
    assert (refused["outcome"], key) == ("invalid_json", b"c" * 32)
    assert refused["detail"] == "a JSON list, not an object"
    too_large, _ = skan.report("d" * 32, 5, "", None, 65536)
    assert too_large["outcome"] == "too_large" and too_large["body"] == ""
    assert too_large["detail"] == "body is over 65536 bytes"


def test_a_body_that_is_not_utf8_is_invalid_json_whatever_it_reads_as():
    body = b'{"version": "3.0", "ad-network-id": "example123.skadnetwork", "x": "\xff"}'
    report, _ = skan.report("e" * 32, 5, "", body, 65536)
    assert report["outcome"] == "invalid_json" and "\ufffd" in report["body"]
    record = skan.postback_record(report, config.load(EXAMPLE_CONFIG).skan)
    assert record["outcome"] == "invalid_json" and record["raw"] == report["body"]


def test_a_spooled_report_is_judged_and_says_so():
    settings = config.load(EXAMPLE_CONFIG)
    report, _ = skan.report("f" * 32, 5, "", json.dumps(APPLE_V3_LOSS).encode(), 65536)
    record = skan.postback_record({**report, "spooled": True}, settings.skan)
    assert (record["outcome"], record["campaign_id"]) == ("verified", "c2")  # source 42
    assert record["detail"].endswith(skan.SPOOLED)


# --- the dedup stage ----------------------------------------------------------------------

DOC = example()
DOC["skan"]["sources"].append({"id": "1234", "campaign": "c1", "pub": "net2"})
SETTINGS = config.parse(copy.deepcopy(DOC))


class Stage:
    """A SkanStage over a dict, remembering what it emitted."""

    def __init__(self, settings=SETTINGS):
        self.table, self.out = {}, []
        self.stage = SkanStage(settings, self.table, lambda key, r: self.out.append((key, r)))
        self.n = 0

    def put(self, postback, at_ms: int = 1_000, partition: int = 0) -> dict:
        body = postback if isinstance(postback, bytes) else json.dumps(postback).encode()
        self.n += 1
        report, key = skan.report(f"{self.n:032x}", at_ms, "", body, 65536)
        return self.replay(report, key, partition)

    def replay(self, report, key, partition=0) -> dict:
        self.stage.on_report(partition, report, key)
        assert self.out[-1][0] == key
        return self.out[-1][1]


def test_a_second_verified_copy_is_a_duplicate_and_a_replay_is_not():
    s = Stage()
    first = s.put(signed(V4))
    assert first["outcome"] == "verified"
    report, key = skan.report(first["skan_id"], 1_000, "", first["raw"].encode(), 65536)
    assert s.replay(report, key) == first  # the same report again: the same record
    again = s.put(signed(V4))
    assert again["outcome"] == "duplicate" and first["skan_id"] in again["detail"]
    assert (again["event"], again["campaign_id"], again["revenue"]) == ("", "", 0)
    assert len(s.table) == 1


def test_a_forged_copy_never_pre_empts_the_genuine_one():
    s = Stage()
    attacker = _private_b64(ec.generate_private_key(ec.SECP256R1()))
    forged = skan.sign(APPLE_V3_WIN, attacker)  # the real transaction-id, another key
    assert s.put(forged)["outcome"] == "invalid_signature"
    tampered = {**APPLE_V3_WIN, "fidelity-type": 0}
    assert s.put(tampered)["outcome"] == "invalid_signature"
    assert s.table == {}  # only verified postbacks enter the table
    # APPLE_V3_WIN verifies with Apple's key, and its network is the example's
    assert s.put(APPLE_V3_WIN)["outcome"] == "verified"
    assert s.put(APPLE_V3_WIN)["outcome"] == "duplicate"


def test_each_postback_of_a_sequence_counts_once():
    s = Stage()
    outcomes = [
        s.put(signed({**V4, "postback-sequence-index": i}))["outcome"] for i in (0, 1, 2, 1)
    ]
    assert outcomes == ["verified", "verified", "verified", "duplicate"]
    assert len(s.table) == 3


def test_entries_expire_after_the_retention():
    doc = copy.deepcopy(DOC)
    doc["skan"]["dedup_retention"] = "10s"
    s = Stage(config.parse(doc))
    s.stage.prepare({0})
    assert s.put(signed(V4), at_ms=1_000)["outcome"] == "verified"
    s.stage.on_tick(0, 10_999)
    assert len(s.table) == 1
    assert s.put(signed(V4), at_ms=5_000)["outcome"] == "duplicate"
    s.stage.on_tick(0, 11_000)
    assert s.table == {}
    assert s.put(signed(V4), at_ms=12_000)["outcome"] == "verified"  # counts again


# --- forwards ---------------------------------------------------------------------------------


def _forward_settings(**acme) -> config.Settings:
    doc = copy.deepcopy(DOC)
    doc["advertisers"][0].update(acme)
    doc["advertisers"].append({"id": "rival", "token": "rival-token"})
    doc["campaigns"].append(
        {"id": "r1", "advertiser": "rival", "destination": "https://r.example/?c={click_id}"}
    )
    doc["skan"]["sources"].append({"id": "99", "campaign": "r1", "pub": "net1"})
    return config.parse(doc)


def test_only_verified_postbacks_of_an_advertiser_with_a_url_are_forwarded():
    settings = _forward_settings()
    s = Stage(settings)
    verified = s.put(signed(V4))  # source 1234: campaign c1 of acme
    assert callback.forward_target(verified, settings).id == "acme"
    duplicate = s.put(signed(V4))
    rival = s.put(signed({**V4, "source-identifier": "9912", "transaction-id": "t-rival"}))
    assert rival["outcome"] == "verified" and rival["campaign_id"] == "r1"
    others = [duplicate, rival, s.put(V4), s.put(b"[]"), s.put({**V4, "version": "9"})]
    assert [callback.forward_target(r, settings) for r in others] == [None] * 5


def test_a_forward_is_the_body_verbatim_signed_with_the_skan_id():
    settings = _forward_settings(signing_secret=SECRET)
    body = json.dumps(signed(V4), indent=1, ensure_ascii=False).encode()  # as sent
    record = Stage(settings).put(body)
    task = callback.from_skan(record, "acme")
    task = codec.CALLBACK_TASK.decode(codec.CALLBACK_TASK.encode(task))  # through Kafka
    assert callback.lane_of(task) == ("advertiser", "acme")
    request = callback.request_of(settings, task, int(time.time()))
    assert request.method == "POST" and request.url == "http://127.0.0.1:9999/skan"
    assert request.body == body
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == record["skan_id"]
    assert request.headers["webhook-id"] == record["skan_id"]
    Webhook(SECRET).verify(request.body, {k.lower(): v for k, v in request.headers.items()})

    attempt = delivery.Attempt(delivery.DELIVERED, 204, "", 1, 5, request.url)
    row = delivery.step(task, attempt, settings.retry_schedule, 2).record
    assert (row["conversion_id"], row["pub"], row["advertiser"]) == (record["skan_id"], "", "acme")
    assert codec.CALLBACK.decode(codec.CALLBACK.encode(row)) == row


def test_publisher_callbacks_keep_their_lane_and_no_advertiser():
    settings = _forward_settings()
    conversion = {name: "" for name in callback.CONVERSION_FIELDS}
    conversion.update(pub="net1", revenue=Decimal(1), payout=Decimal(1), conversion_ts_ms=1)
    conversion.update(click_ts_ms=None, ctit_seconds=None, txn_id=None)
    task = callback.from_conversion(conversion)
    assert callback.lane_of(task) == ("pub", "net1") and task["advertiser"] == ""
    assert callback.request_of(settings, task, 1).url.startswith("http://127.0.0.1:9999/cb?")
