"""SKAdNetwork core: Apple's own postbacks, every field layout, every outcome, the config.

Where the real postbacks below come from:
- APPLE_V4_FINE, APPLE_V4_COARSE: Apple, "Verifying an install-validation postback"
  (the two version 4.0 examples: a web ad in a high and in a low postback data tier).
- APPLE_V3_WIN, APPLE_V3_LOSS: Apple, "Combining parameters for SKAdNetwork 3
  postbacks" (the winning and the nonwinning postback).
- APPLE_V2_2: Apple, "Combining parameters for previous SKAdNetwork postback versions".
- APPLE_V2_1: Apple's version 2.1 example from an earlier revision of "Verifying an
  install-validation postback"; today's page no longer shows it, public verifiers
  keep it as test data.
- DEVICE_V1_0, DEVICE_V2_0: postbacks real devices sent, signed with Apple's P-192
  key, from the test suite of a public open-source Go verifier (package
  `skanpostback`). Apple publishes no 1.0 or 2.0 example that verifies: the one in
  the original "Verifying an Install Validation Postback" page does not.
Every other signature here is made with the test keys below.
"""

import base64
import hashlib
import json
from decimal import Decimal

import fastavro
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline import codec
from pipeline.config import ConfigError
from pipeline.core import skan
from pipeline.core.skan_config import SkanConfig, parse_skan

SEP = "\u2063"

APPLE_V4_FINE = {
    "version": "4.0",
    "ad-network-id": "com.example",
    "source-identifier": "5239",
    "app-id": 525463029,
    "transaction-id": "6aafb7a5-0170-41b5-bbe4-fe71dedf1e30",
    "redownload": False,
    "source-domain": "example.com",
    "fidelity-type": 1,
    "did-win": True,
    "conversion-value": 63,
    "postback-sequence-index": 0,
    "attribution-signature": "MEUCIGRmSMrqedNu6uaHyhVcifs118R5z/AB6cvRaKrRRHWRAiEAv96ne3dKQ5kJpbsf"
    "k4eYiePmrZUU6sQmo+7zfP/1Bxo=",
}
APPLE_V4_COARSE = {
    "version": "4.0",
    "ad-network-id": "com.example",
    "source-identifier": "39",
    "app-id": 525463029,
    "transaction-id": "6aafb7a5-0170-41b5-bbe4-fe71dedf1e31",
    "redownload": False,
    "source-domain": "example.com",
    "fidelity-type": 1,
    "did-win": True,
    "coarse-conversion-value": "high",
    "postback-sequence-index": 0,
    "attribution-signature": "MEUCIQD4rX6eh38qEhuUKHdap345UbmlzA7KEZ1bhWZuYM8MJwIgMnyiiZe6heabDkGw"
    "OaKBYrUXQhKtF3P/ERHqkR/XpuA=",
}
APPLE_V3_WIN = {
    "version": "3.0",
    "ad-network-id": "example123.skadnetwork",
    "campaign-id": 42,
    "transaction-id": "6aafb7a5-0170-41b5-bbe4-fe71dedf1e28",
    "app-id": 525463029,
    "attribution-signature": "MEYCIQD5eq3AUlamORiGovqFiHWI4RZT/PrM3VEiXUrsC+M51wIhAPMANZA9c07raZJ6"
    "4gVaXhB9+9yZj/X6DcNxONdccQij",
    "redownload": True,
    "source-app-id": 1234567891,
    "fidelity-type": 1,
    "conversion-value": 20,
    "did-win": True,
}
APPLE_V3_LOSS = {
    "version": "3.0",
    "ad-network-id": "example123.skadnetwork",
    "campaign-id": 42,
    "transaction-id": "f9ac267a-a889-44ce-b5f7-0166d11461f0",
    "app-id": 525463029,
    "attribution-signature": "MEUCIQDDetUtkyc/MiQvVJ5I6HIO1E7l598572Wljot2Onzd4wIgVJLzVcyAV+TXksGN"
    "oa0DTMXEPgNPeHCmD4fw1ABXX0g=",
    "redownload": True,
    "fidelity-type": 1,
    "did-win": False,
}
APPLE_V2_2 = {
    "version": "2.2",
    "ad-network-id": "com.example",
    "campaign-id": 42,
    "transaction-id": "6aafb7a5-0170-41b5-bbe4-fe71dedf1e28",
    "app-id": 525463029,
    "attribution-signature": "MEYCIQDTuQ1Z4Tpy9D3aEKbxLl5J5iKiTumcqZikuY/AOD2U7QIhAJAaiAv89AoquHXJ"
    "ffcieEQXdWHpcV8ZgbKN0EwV9/sY",
    "redownload": True,
    "source-app-id": 1234567891,
    "fidelity-type": 1,
    "conversion-value": 20,
}
APPLE_V2_1 = {
    "version": "2.1",
    "ad-network-id": "com.example",
    "campaign-id": 42,
    "transaction-id": "6aafb7a5-0170-41b5-bbe4-fe71dedf1e28",
    "app-id": 525463029,
    "attribution-signature": "MEUCID6rbq3qt4GvFaAaynh5/LAcvn1d8CQTRhrZhLIxLKntAiEAo7IrvoMw6u2qDg6T"
    "r5vIsEHXjlLkPlCOL0ojJcEh3Qw=",
    "redownload": True,
    "source-app-id": 1234567891,
    "conversion-value": 20,
}
DEVICE_V1_0 = {
    "ad-network-id": "su67r6k2v3.skadnetwork",
    "app-id": 1176027022,
    "attribution-signature": "MDMCGELMEaJCS0y1JXqjZujcMXdJel8boLV6PAIXFNKYjzROJY2CxAmU+HoPQfTJCyjo"
    "S6k=",
    "campaign-id": 51,
    "redownload": False,
    "transaction-id": "583e867c-0bc5-4980-8766-6d8cf992f24a",
    "version": "1.0",
}
DEVICE_V2_0 = {
    "ad-network-id": "v9wttpbfk9.skadnetwork",
    "app-id": 1176027022,
    "attribution-signature": "MDQCGDYZvzXjCRDEcFjJu2xd4kaOPwK+sJpUbgIYZRiWFh0Lpz7KFnF3qrXdyl9sAG8j"
    "6gne",
    "campaign-id": 75,
    "conversion-value": 18,
    "redownload": True,
    "transaction-id": "c4a69044-1c85-4755-9e25-97d8daa30c55",
    "version": "2.0",
}
REAL = {
    "4.0 fine": APPLE_V4_FINE,
    "4.0 coarse": APPLE_V4_COARSE,
    "3.0 win": APPLE_V3_WIN,
    "3.0 loss": APPLE_V3_LOSS,
    "2.2": APPLE_V2_2,
    "2.1": APPLE_V2_1,
    "2.0 device": DEVICE_V2_0,
    "1.0 device": DEVICE_V1_0,
}


def _test_key(curve: ec.EllipticCurve, label: str) -> ec.EllipticCurvePrivateKey:
    """A fixed key, so the signatures in schemas/examples/ verify in every run."""
    secret = hashlib.sha256(label.encode()).digest()[: curve.key_size // 8]
    return ec.derive_private_key(int.from_bytes(secret, "big"), curve)


def _public_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


P256 = _test_key(ec.SECP256R1(), "pipeline skan test key p256")
P192 = _test_key(ec.SECP192R1(), "pipeline skan test key p192")
TEST_KEYS = {"p192": _public_b64(P192), "p256": _public_b64(P256)}


def sign(postback: dict, message: str | None = None) -> dict:
    """The postback with a test signature over `message` (default: signed_message)."""
    key = P192 if skan.KEY_FAMILY[skan.version_of(postback)] == "p192" else P256
    message = skan.signed_message(postback) if message is None else message
    signature = key.sign(message.encode(), ec.ECDSA(hashes.SHA256()))
    return {**postback, "attribution-signature": base64.b64encode(signature).decode()}


CAMPAIGNS = {"c1": object(), "c2": object()}
PUBLISHERS = {"net1": object(), "net2": object()}
FX = {"EUR": Decimal("1.08"), "GBP": Decimal("1.5")}
# the config the schema examples were evaluated with
EXAMPLE_SKAN = {
    "ad_network_ids": ["example123.skadnetwork"],
    "sources": [
        {"id": "12", "campaign": "c1", "pub": "net1"},
        {"id": "1234", "campaign": "c2", "pub": "net2"},
        {"id": "42", "campaign": "c1", "pub": "net2"},
    ],
    "apps": {
        "123456789": {
            "fine": [
                {"values": "0", "event": "install"},
                {"values": "1-63", "event": "purchase", "revenue": 4.99},
            ],
            "coarse": {
                "low": "install",
                "medium": "purchase",
                "high": {"event": "purchase", "revenue": 9.99},
            },
        },
        "525463029": {
            "currency": "EUR",
            "fine": [
                {"values": "0", "event": "install"},
                {"values": "1-39", "event": "trial"},
                {"values": "40-63", "event": "purchase", "revenue": 19.99},
            ],
        },
    },
}


def config(table: dict | None = None) -> SkanConfig:
    return parse_skan(EXAMPLE_SKAN if table is None else table, CAMPAIGNS, PUBLISHERS, FX, "USD")


def evaluate(postback, table: dict | None = None, keys=TEST_KEYS) -> dict:
    body = postback if isinstance(postback, bytes) else json.dumps(postback).encode()
    return skan.evaluate(body, config(table), keys)


# --- Apple's own postbacks ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL))
def test_apples_postbacks_verify_with_apples_keys(name):
    assert skan.verify(REAL[name])
    assert skan.verify(REAL[name], skan.APPLE_KEYS)
    assert not skan.verify(REAL[name], TEST_KEYS)


@pytest.mark.parametrize("name", sorted(REAL))
def test_a_tampered_copy_of_each_fails(name):
    postback = REAL[name]
    signed = [f for f in skan.SIGNED_FIELDS[skan.version_of(postback)] if f in postback]
    for field in signed:
        value = postback[field]
        if isinstance(value, bool):
            tampered = not value
        elif isinstance(value, int):
            tampered = value + 1
        else:
            tampered = value + "0"
        if field == "version":
            with pytest.raises(skan.SkanError):
                skan.verify({**postback, field: tampered})
        else:
            assert not skan.verify({**postback, field: tampered}), field
    signature = base64.b64decode(postback["attribution-signature"])
    flipped = signature[:-1] + bytes([signature[-1] ^ 1])
    assert not skan.verify(
        {**postback, "attribution-signature": base64.b64encode(flipped).decode()}
    )


def test_conversion_values_are_not_signed():
    assert skan.verify({**APPLE_V4_FINE, "conversion-value": 0})
    assert skan.verify({**APPLE_V4_COARSE, "coarse-conversion-value": "low"})
    assert skan.verify({**APPLE_V3_WIN, "conversion-value": 63})


def test_the_signed_strings_of_apples_examples():
    assert skan.signed_message(APPLE_V4_FINE) == SEP.join(
        ["4.0", "com.example", "5239", "525463029", "6aafb7a5-0170-41b5-bbe4-fe71dedf1e30"]
        + ["false", "example.com", "1", "true", "0"]
    )
    assert skan.signed_message(APPLE_V3_LOSS) == SEP.join(
        ["3.0", "example123.skadnetwork", "42", "525463029"]
        + ["f9ac267a-a889-44ce-b5f7-0166d11461f0", "true", "1", "false"]
    )
    assert skan.signed_message(DEVICE_V1_0) == SEP.join(
        ["su67r6k2v3.skadnetwork", "51", "1176027022", "583e867c-0bc5-4980-8766-6d8cf992f24a"]
    )


# --- every field layout, signed with test keys ---------------------------------------

TXN = "0b6c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3"
BASE = {"ad-network-id": "example123.skadnetwork", "app-id": 123456789, "transaction-id": TXN}
V3 = {**BASE, "version": "3.0", "campaign-id": 42, "redownload": False, "fidelity-type": 1}
V4 = {**BASE, "version": "4.0", "source-identifier": "1234", "redownload": False}
V4 = {**V4, "fidelity-type": 1, "did-win": True, "postback-sequence-index": 0}
NET, APP = "example123.skadnetwork", "123456789"
LAYOUTS = {
    "1.0 without version": ({**BASE, "campaign-id": 7}, [NET, "7", APP, TXN]),
    "1.0": ({**BASE, "version": "1.0", "campaign-id": 7}, [NET, "7", APP, TXN]),
    "2.0 with source-app-id": (
        {**BASE, "version": "2.0", "campaign-id": 7, "redownload": True, "source-app-id": 55},
        ["2.0", NET, "7", APP, TXN, "true", "55"],
    ),
    "2.0 without source-app-id": (
        {**BASE, "version": "2.0", "campaign-id": 7, "redownload": False},
        ["2.0", NET, "7", APP, TXN, "false"],
    ),
    "2.1 with source-app-id": (
        {**BASE, "version": "2.1", "campaign-id": 7, "redownload": False, "source-app-id": 55},
        ["2.1", NET, "7", APP, TXN, "false", "55"],
    ),
    "2.1 without source-app-id": (
        {**BASE, "version": "2.1", "campaign-id": 7, "redownload": True},
        ["2.1", NET, "7", APP, TXN, "true"],
    ),
    "2.2 view-through, without source-app-id": (
        {**BASE, "version": "2.2", "campaign-id": 7, "redownload": True, "fidelity-type": 0},
        ["2.2", NET, "7", APP, TXN, "true", "0"],
    ),
    "2.2 with source-app-id": (
        {**BASE, "version": "2.2", "campaign-id": 7, "redownload": False, "fidelity-type": 1}
        | {"source-app-id": 55},
        ["2.2", NET, "7", APP, TXN, "false", "55", "1"],
    ),
    "3.0 win with source-app-id": (
        {**V3, "source-app-id": 55, "did-win": True, "conversion-value": 5},
        ["3.0", NET, "42", APP, TXN, "false", "55", "1", "true"],
    ),
    "3.0 win without source-app-id": (
        {**V3, "did-win": True, "redownload": True},
        ["3.0", NET, "42", APP, TXN, "true", "1", "true"],
    ),
    "3.0 loss, view-through": (
        {**V3, "did-win": False, "fidelity-type": 0},
        ["3.0", NET, "42", APP, TXN, "false", "0", "false"],
    ),
    "4.0 app ad, sequence 0": (
        {**V4, "source-app-id": 55, "conversion-value": 9},
        ["4.0", NET, "1234", APP, TXN, "false", "55", "1", "true", "0"],
    ),
    "4.0 web ad, sequence 0": (
        {**V4, "source-domain": "news.example", "redownload": True},
        ["4.0", NET, "1234", APP, TXN, "true", "news.example", "1", "true", "0"],
    ),
    "4.0 neither, sequence 1, coarse": (
        {**V4, "source-identifier": "12", "postback-sequence-index": 1}
        | {"coarse-conversion-value": "medium"},
        ["4.0", NET, "12", APP, TXN, "false", "1", "true", "1"],
    ),
    "4.0 sequence 2, view-through": (
        {**V4, "postback-sequence-index": 2, "fidelity-type": 0}
        | {"coarse-conversion-value": "low"},
        ["4.0", NET, "1234", APP, TXN, "false", "0", "true", "2"],
    ),
    "4.0 loss": (
        {**V4, "did-win": False, "source-identifier": "123"},
        ["4.0", NET, "123", APP, TXN, "false", "1", "false", "0"],
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_field_layout(name):
    postback, values = LAYOUTS[name]
    assert skan.signed_message(postback) == SEP.join(values)
    signed = sign(postback, SEP.join(values))  # signed over the expected string itself
    assert skan.verify(signed, TEST_KEYS)
    assert not skan.verify(signed)  # not Apple's signature
    # an optional field added afterwards changes the string: the signature breaks
    for field in ("source-app-id", "source-domain"):
        if field in skan.SIGNED_FIELDS[skan.version_of(postback)] and field not in postback:
            assert not skan.verify({**signed, field: "1"}, TEST_KEYS), field


def test_a_postback_signed_with_the_other_curve_fails():
    postback = LAYOUTS["2.0 with source-app-id"][0]
    message = skan.signed_message(postback).encode()
    signature = P256.sign(message, ec.ECDSA(hashes.SHA256()))
    forged = {**postback, "attribution-signature": base64.b64encode(signature).decode()}
    assert not skan.verify(forged, TEST_KEYS)
    assert skan.verify(forged, {"p192": TEST_KEYS["p256"], "p256": TEST_KEYS["p256"]})


@pytest.mark.parametrize("version", ["5.0", "4", "4.1", "", None, 4.0, 3, ["4.0"]])
def test_unsupported_versions(version):
    postback = {**V4, "version": version}
    with pytest.raises(skan.SkanError) as e:
        skan.signed_message(postback)
    assert e.value.outcome == "unsupported_version"
    with pytest.raises(skan.SkanError):
        skan.verify(postback)
    assert evaluate(postback)["outcome"] == "unsupported_version"


@pytest.mark.parametrize(
    "change,detail",
    [
        ({"transaction-id": None}, "signed field transaction-id is missing"),
        ({"did-win": None}, "signed field did-win is missing"),
        ({"redownload": [True]}, "signed field redownload is [true]"),
        ({"source-identifier": 12.0}, "signed field source-identifier is 12.0"),
        ({"attribution-signature": None}, "attribution-signature is missing"),
        ({"attribution-signature": "not base64!"}, "attribution-signature is not base64"),
        ({"attribution-signature": "AAAA"}, "does not verify with the p256 key"),
    ],
)
def test_why_a_signature_does_not_hold(change, detail):
    postback = {**sign(V4), **change}
    postback = {k: v for k, v in postback.items() if v is not None}
    assert not skan.verify(postback, TEST_KEYS)
    result = evaluate(postback)
    assert result["outcome"] == "invalid_signature"
    assert detail in result["detail"]


# --- outcomes, in their order --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"null",
        b"\xff\xfe{}",
        b'{"version": NaN}',
        b'{"a": 1',
        b"[" * 100000 + b"]" * 100000,
        b'{"campaign-id": ' + b"9" * 5000 + b"}",
        "{}".encode("utf-16"),
    ],
)
def test_anything_that_is_not_a_json_object_is_invalid_json(body):
    result = evaluate(body)
    assert result["outcome"] == "invalid_json"
    assert result["raw"] == body.decode("utf-8", "replace")
    assert result["detail"]


def test_checks_run_in_order():
    bad_everything = {**V4, "version": "9.9", "ad-network-id": "other1.skadnetwork"}
    assert evaluate(bad_everything)["outcome"] == "unsupported_version"
    wrong_network_bad_signature = {**V4, "ad-network-id": "other1.skadnetwork"}
    assert evaluate(wrong_network_bad_signature)["outcome"] == "wrong_ad_network"
    bad_signature_unknown_source = {**V4, "source-identifier": "99"}
    assert evaluate(bad_signature_unknown_source)["outcome"] == "invalid_signature"
    assert evaluate(sign({**V4, "source-identifier": "99"}))["outcome"] == "unknown_source"
    assert evaluate(sign(V4))["outcome"] == "verified"


def test_wrong_ad_network_and_its_case():
    result = evaluate(sign({**V4, "ad-network-id": "other1.skadnetwork"}))
    assert result["outcome"] == "wrong_ad_network"
    assert "other1.skadnetwork" in result["detail"]
    assert result["event"] == "" and result["campaign_id"] == ""
    upper = sign({**V4, "ad-network-id": "EXAMPLE123.SKADNETWORK"})
    assert evaluate(upper)["outcome"] == "verified"
    assert evaluate({**sign(V4), "ad-network-id": None})["outcome"] == "wrong_ad_network"


def test_without_a_skan_table_every_postback_is_wrong_ad_network():
    for table in ({}, None):
        result = skan.evaluate(json.dumps(sign(V4)).encode(), parse_skan(table, {}, {}, {}, "USD"))
        assert result["outcome"] == "wrong_ad_network"
        assert "SKAdNetwork is off" in result["detail"]


def test_apples_v3_example_evaluates_with_apples_keys():
    result = skan.evaluate(json.dumps(APPLE_V3_WIN).encode(), config())
    assert result["outcome"] == "verified"
    assert (result["campaign_id"], result["pub"], result["event"]) == ("c1", "net2", "trial")
    assert result["revenue"] == Decimal("0.000000") and result["currency"] == "EUR"
    loss = skan.evaluate(json.dumps(APPLE_V3_LOSS).encode(), config())
    assert (loss["outcome"], loss["event"], loss["did_win"]) == ("verified", "", False)
    assert loss["source_app_id"] == "" and loss["conversion_value"] is None


def test_the_record_carries_every_apple_field():
    body = json.dumps(sign({**V4, "source-app-id": 55, "conversion-value": 42})).encode()
    result = skan.evaluate(body, config(), TEST_KEYS)
    assert result["version"] == "4.0" and result["ad_network_id"] == NET
    assert result["source_identifier"] == "1234" and result["skan_campaign_id"] == ""
    assert result["app_id"] == APP and result["source_app_id"] == "55"
    assert result["source_domain"] == "" and result["transaction_id"] == TXN
    assert result["redownload"] is False and result["did_win"] is True
    assert result["fidelity_type"] == 1 and result["postback_sequence_index"] == 0
    assert result["conversion_value"] == 42 and result["coarse_conversion_value"] == ""
    assert result["attribution_signature"] and result["raw"] == body.decode()
    v1 = evaluate(sign(LAYOUTS["1.0 without version"][0]))
    assert v1["version"] == "" and v1["skan_campaign_id"] == "7"
    assert v1["redownload"] is None and v1["did_win"] is None


OUTCOMES = {
    "verified",
    "invalid_json",
    "unsupported_version",
    "wrong_ad_network",
    "invalid_signature",
    "unknown_source",
}
WEIRD = [None, True, -1, 2**40, 1.5, [], {"a": [1]}, "x" * 300, "\ud800", "é中🙂"]


@pytest.mark.parametrize("value", WEIRD, ids=repr)
def test_no_value_anywhere_breaks_evaluate_or_the_schema(value):
    c = codec.Codec("skan_postback")
    fields = [*skan.SIGNED_FIELDS["4.0"], "conversion-value", "coarse-conversion-value"]
    for field in [*fields, "attribution-signature", "campaign-id"]:
        for base in (sign(V4), sign(V3 | {"did-win": True})):
            body = json.dumps({**base, field: value}).encode()
            record = {"skan_id": "0" * 32, "received_at_ms": 1, "source_ip": "", **evaluate(body)}
            assert record["outcome"] in OUTCOMES - {"invalid_json", "unknown_source"}
            assert c.decode(c.encode(record)) == record


# --- sources ------------------------------------------------------------------------

SOURCES = {
    "sources": [
        {"id": "1", "campaign": "c1", "pub": "net1"},
        {"id": "12", "campaign": "c1", "pub": "net1"},
        {"id": "123", "campaign": "c2", "pub": "net1"},
        {"id": "1234", "campaign": "c2", "pub": "net2"},
        {"id": "100", "campaign": "c2", "pub": "net2"},
    ]
}


@pytest.mark.parametrize(
    "source_identifier,expected",
    [
        ("1234", "1234"),
        ("1235", "123"),
        ("123", "123"),
        ("129", "12"),
        ("12", "12"),
        ("1299", "12"),
        ("13", None),  # "1" is a v2/v3 campaign-id: v4 prefixes have 2-4 digits
        ("1000", "100"),
        ("5239", None),
        ("12345", None),
        ("1a", None),
        (1234, None),
    ],
)
def test_v4_source_identifiers_match_the_longest_prefix(source_identifier, expected):
    sources = config(SOURCES).sources
    source = skan.match_source({**V4, "source-identifier": source_identifier}, sources)
    assert (source.id if source else None) == expected


@pytest.mark.parametrize(
    "campaign_id,expected", [(1, "1"), (12, "12"), (100, "100"), (2, None), (1234, "1234")]
)
def test_v2_v3_campaign_ids_match_exactly(campaign_id, expected):
    sources = config(SOURCES).sources
    for version in ("2.0", "2.1", "2.2", "3.0"):
        postback = {**V3, "version": version, "campaign-id": campaign_id}
        source = skan.match_source(postback, sources)
        assert (source.id if source else None) == expected


def test_unknown_source_names_what_did_not_match():
    result = evaluate(sign({**V4, "source-identifier": "5239"}))
    assert result["outcome"] == "unknown_source"
    assert result["detail"] == "source-identifier '5239' matches no [[skan.sources]] id"
    v3 = evaluate(sign({**V3, "campaign-id": 99, "did-win": True}))
    assert (v3["outcome"], v3["detail"]) == (
        "unknown_source",
        "campaign-id 99 matches no [[skan.sources]] id",
    )
    assert v3["campaign_id"] == "" and v3["event"] == ""


# --- decoding and amounts --------------------------------------------------------------

DECODING = {
    "ad_network_ids": ["example123.skadnetwork"],
    "sources": [{"id": "12", "campaign": "c1", "pub": "net1"}],
    "apps": {
        "123456789": {
            "currency": "GBP",
            "fine": [
                {"values": 0, "event": "install"},
                {"values": "1-9", "event": "level_up", "revenue": "1.234567"},
                {"values": "20-63", "event": "purchase", "revenue": 4.99},
            ],
            "coarse": {"low": "install", "high": {"event": "purchase", "revenue": 9.99}},
        }
    },
}
V4_12 = {**V4, "source-identifier": "12"}


@pytest.mark.parametrize(
    "values,event,revenue,reporting,detail",
    [
        ({}, "install", "0", "0", ""),
        ({"conversion-value": 0}, "install", "0", "0", ""),
        # 1.234567 x 1.5 = 1.8518505: half-even keeps the even 0
        ({"conversion-value": 5}, "level_up", "1.234567", "1.851850", ""),
        ({"conversion-value": 63}, "purchase", "4.99", "7.485", ""),
        ({"conversion-value": 15}, "", "0", "0", "conversion-value 15 has no rule"),
        ({"conversion-value": 64}, "", "0", "0", "conversion-value 64 is not a valid value"),
        ({"conversion-value": "5"}, "", "0", "0", "is not a valid value"),
        ({"conversion-value": True}, "", "0", "0", "is not a valid value"),
        ({"coarse-conversion-value": "low"}, "install", "0", "0", ""),
        ({"coarse-conversion-value": "high"}, "purchase", "9.99", "14.985", ""),
        ({"coarse-conversion-value": "medium"}, "", "0", "0", "'medium' has no rule"),
        ({"coarse-conversion-value": "max"}, "", "0", "0", "'max' is not a valid value"),
        # a fine value wins over a coarse one (Apple sends one or the other)
        (
            {"conversion-value": 5, "coarse-conversion-value": "high"},
            "level_up",
            "1.234567",
            "1.851850",
            "",
        ),
        ({"did-win": False, "conversion-value": 63}, "", "0", "0", "did not win"),
        ({"did-win": False}, "", "0", "0", "did not win the attribution"),
    ],
)
def test_decoding(values, event, revenue, reporting, detail):
    result = evaluate(sign(V4_12 | values), DECODING)
    assert result["outcome"] == "verified"
    assert result["event"] == event
    assert result["revenue"] == Decimal(revenue) and result["revenue"].as_tuple().exponent == -6
    assert result["revenue_reporting"] == Decimal(reporting)
    assert result["revenue_reporting"].as_tuple().exponent == -6
    assert (result["currency"], result["campaign_id"], result["pub"]) == ("GBP", "c1", "net1")
    assert detail in result["detail"] and bool(detail) == bool(result["detail"])


@pytest.mark.parametrize("sequence", [0, 1, 2])
def test_every_postback_of_the_sequence_decodes(sequence):
    postback = sign({**V4_12, "postback-sequence-index": sequence})
    result = evaluate(postback | {"coarse-conversion-value": "high"}, DECODING)
    assert (result["outcome"], result["event"]) == ("verified", "purchase")
    assert result["postback_sequence_index"] == sequence


def test_an_app_without_rules():
    other_app = sign({**V4_12, "app-id": 999})
    assert evaluate(other_app, DECODING)["event"] == "install"
    result = evaluate(other_app | {"conversion-value": 3}, DECODING)
    assert (result["outcome"], result["event"]) == ("verified", "")
    assert result["detail"] == "conversion-value 3: app 999 has no [skan.apps] entry"
    assert result["currency"] == "USD"


def test_reporting_currency_apps_have_rate_1():
    result = evaluate(sign(V4_12 | {"app-id": 123456789}) | {"conversion-value": 1})
    assert (result["event"], result["currency"]) == ("purchase", "USD")
    assert result["revenue"] == result["revenue_reporting"] == Decimal("4.990000")


def test_not_verified_records_decode_nothing():
    for postback in ({**V4, "conversion-value": 63}, {**V4, "version": "0.9"}):
        result = evaluate(postback)
        assert result["outcome"] != "verified"
        assert (result["event"], result["currency"], result["campaign_id"], result["pub"]) == (
            ("", "", "", "")
        )
        assert result["revenue"] == result["revenue_reporting"] == 0


# --- dedup keys and records of reports -----------------------------------------------------


def test_dedup_key():
    first = evaluate(sign(V4))
    assert skan.dedup_key(first) == skan.dedup_key(evaluate(sign(V4)))
    later = evaluate(sign({**V4, "postback-sequence-index": 1}))
    other = evaluate(sign({**V4, "transaction-id": "another"}))
    assert len({skan.dedup_key(r) for r in (first, later, other)}) == 3
    v3 = evaluate(sign({**V3, "campaign-id": 12, "did-win": True}))
    assert skan.dedup_key(v3) == f"{TXN}\x00".encode()


def _examples(name: str) -> dict:
    directory = codec.SCHEMA_DIR / "examples" / name
    return {p.name: json.loads(p.read_text()) for p in directory.iterdir()}


def test_the_schema_examples_are_what_evaluate_makes():
    reports, postbacks = _examples("skan_report"), _examples("skan_postback")
    assert reports.keys() == postbacks.keys()
    outcomes = set()
    report_codec, postback_codec = codec.Codec("skan_report"), codec.Codec("skan_postback")
    for name, report in reports.items():
        assert fastavro.validate(report, report_codec.schema)
        assert report_codec.decode(report_codec.encode(report)) == report
        expected = postback_codec.from_json(postbacks[name])
        assert fastavro.validate(expected, postback_codec.schema)
        assert postback_codec.decode(postback_codec.encode(expected)) == expected
        made = skan.postback_record(report, config(), TEST_KEYS)
        if name.startswith("duplicate-"):  # what the dedup stage makes of a second copy
            made = skan.duplicate(made, reports["verified-v3.json"]["skan_id"])
        assert made == expected, name
        outcomes.add(expected["outcome"])
    assert outcomes == OUTCOMES | {"too_large", "duplicate"}


# --- config ----------------------------------------------------------------------------


def test_the_example_config():
    cfg = config()
    assert cfg.ad_network_ids == {"example123.skadnetwork"}
    assert cfg.sources["1234"].campaign == "c2" and cfg.sources["1234"].pub == "net2"
    app = cfg.apps["525463029"]
    assert (app.currency, app.rate) == ("EUR", Decimal("1.08"))
    assert app.fine[0].event == "install" and app.fine[39].event == "trial"
    assert app.fine[40].revenue == Decimal("19.99") and app.coarse == {}
    usd = cfg.apps["123456789"]
    assert (usd.currency, usd.rate) == ("USD", 1)
    assert usd.coarse["medium"].event == "purchase" and usd.coarse["medium"].revenue == 0
    assert usd.coarse["high"].revenue == Decimal("9.99")


def test_a_fine_table_may_leave_gaps():
    cfg = config(DECODING)
    assert [v for v, rule in enumerate(cfg.apps["123456789"].fine) if rule is None] == list(
        range(10, 20)
    )


APP_KEY = 'skan.apps."123"'


def _app(**table) -> dict:
    return {"ad_network_ids": [], "apps": {"123": table}}


def _fine(*rules) -> dict:
    return _app(fine=list(rules))


def _source(**overrides) -> dict:
    return {"sources": [{"id": "12", "campaign": "c1", "pub": "net1", **overrides}]}


BAD_CONFIGS = [
    ([], "skan"),
    ({"ad_network_id": ["a.skadnetwork"]}, "skan.ad_network_id"),
    ({"ad_network_ids": "example123.skadnetwork"}, "skan.ad_network_ids"),
    ({"ad_network_ids": ["Example123.skadnetwork"]}, "skan.ad_network_ids[0]"),
    ({"ad_network_ids": ["example123"]}, "skan.ad_network_ids[0]"),
    ({"ad_network_ids": ["com.example"]}, "skan.ad_network_ids[0]"),
    ({"ad_network_ids": ["ex-ample.skadnetwork"]}, "skan.ad_network_ids[0]"),
    ({"ad_network_ids": [5]}, "skan.ad_network_ids[0]"),
    ({"ad_network_ids": ["a1.skadnetwork", "a1.skadnetwork"]}, "skan.ad_network_ids[1]"),
    ({"sources": {"id": "12"}}, "skan.sources"),
    ({"sources": ["12"]}, "skan.sources[0]"),
    (_source(extra=1), "skan.sources[0].extra"),
    (_source(id=12), "skan.sources[0].id"),
    (_source(id="12345"), "skan.sources[0].id"),
    (_source(id="1a"), "skan.sources[0].id"),
    (_source(id=""), "skan.sources[0].id"),
    (_source(id="0"), "skan.sources[0].id"),
    ({"sources": _source()["sources"] * 2}, "skan.sources[1].id"),
    (_source(campaign="c9"), "skan.sources[0].campaign"),
    (_source(campaign=None), "skan.sources[0].campaign"),
    (_source(pub="net9"), "skan.sources[0].pub"),
    ({"apps": []}, "skan.apps"),
    ({"apps": {"abc": {}}}, 'skan.apps."abc"'),
    ({"apps": {"12a": {}}}, 'skan.apps."12a"'),
    ({"apps": {"": {}}}, 'skan.apps.""'),
    ({"apps": {"123": "install"}}, APP_KEY),
    (_app(extra=1), f"{APP_KEY}.extra"),
    (_app(currency="JPY"), f"{APP_KEY}.currency"),
    (_app(currency=5), f"{APP_KEY}.currency"),
    (_app(fine={"values": "0"}), f"{APP_KEY}.fine"),
    (_fine("0"), f"{APP_KEY}.fine[0]"),
    (_fine({"values": "0", "event": "install", "payout": 1}), f"{APP_KEY}.fine[0].payout"),
    (_fine({"event": "install"}), f"{APP_KEY}.fine[0].values"),
]
BAD_CONFIGS += [
    (_fine({"values": v, "event": "install"}), f"{APP_KEY}.fine[0].values")
    for v in ["64", "0-64", "-1", "5-3", "1-", "1--2", "a", "", " 1", 1.5, True, 64, "100"]
]
BAD_CONFIGS += [
    (
        _fine({"values": "0-10", "event": "install"}, {"values": "10-20", "event": "purchase"}),
        f"{APP_KEY}.fine[1].values",
    ),
    (
        _fine(
            {"values": "5", "event": "a"},
            {"values": "6", "event": "b"},
            {"values": "0-63", "event": "c"},
        ),
        f"{APP_KEY}.fine[2].values",
    ),
]
BAD_CONFIGS += [
    (_fine({"values": "0", "event": e}), f"{APP_KEY}.fine[0].event")
    for e in ["Purchase", "", "a" * 65, "buy-now", None, 5]
]
BAD_CONFIGS += [
    (_fine({"values": "0", "event": "install", "revenue": r}), f"{APP_KEY}.fine[0].revenue")
    for r in [-0.01, "-1", "abc", True, "NaN", "Infinity", [1], 10**12, 1e12]
]
BAD_CONFIGS += [
    (_app(coarse=["low"]), f"{APP_KEY}.coarse"),
    (_app(coarse={"extreme": "install"}), f"{APP_KEY}.coarse.extreme"),
    (_app(coarse={"Low": "install"}), f"{APP_KEY}.coarse.Low"),
    (_app(coarse={"low": "Install"}), f"{APP_KEY}.coarse.low"),
    (_app(coarse={"low": 1}), f"{APP_KEY}.coarse.low"),
    (_app(coarse={"high": {"event": "x", "payout": 1}}), f"{APP_KEY}.coarse.high.payout"),
    (_app(coarse={"high": {"event": "x", "revenue": -1}}), f"{APP_KEY}.coarse.high.revenue"),
    (_app(coarse={"high": {"revenue": 1}}), f"{APP_KEY}.coarse.high.event"),
    # 999999999999 EUR is more than 12 digits of the reporting currency
    (
        _app(currency="EUR", fine=[{"values": "0", "event": "x", "revenue": 999999999999}]),
        f"{APP_KEY}.fine[0].revenue",
    ),
]


@pytest.mark.parametrize("table,key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_config_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as e:
        parse_skan(table, CAMPAIGNS, PUBLISHERS, FX, "USD")
    assert e.value.key == key
    assert str(e.value).startswith(f"config error at {key}: ")


def test_config_accepts_what_it_documents():
    cfg = parse_skan(
        {
            "ad_network_ids": ["abc123.skadnetwork", "x9.skadnetwork"],
            "sources": [{"id": "7", "campaign": "c1", "pub": "net1"}],
            "apps": {
                "123": {
                    "currency": "GBP",
                    "fine": [{"values": 5, "event": "a", "revenue": "0.5"}],
                    "coarse": {"low": "a", "medium": {"event": "b"}},
                },
                "456": {},
            },
        },
        CAMPAIGNS,
        PUBLISHERS,
        FX,
        "USD",
    )
    assert cfg.ad_network_ids == {"abc123.skadnetwork", "x9.skadnetwork"}
    assert cfg.apps["123"].fine[5].revenue == Decimal("0.5")
    assert cfg.apps["456"].fine == (None,) * 64 and cfg.apps["456"].currency == "USD"
    assert parse_skan(None, {}, {}, {}, "EUR") == SkanConfig(reporting_currency="EUR")
