"""Config validation: every error names its key; the example config loads."""

import copy
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline import config

EXAMPLE = Path(__file__).parent.parent / "deploy" / "example.toml"


@pytest.fixture
def doc():
    with open(EXAMPLE, "rb") as f:
        return tomllib.load(f)


def test_example_config_loads():
    s = config.load(EXAMPLE)
    assert s.campaigns["c1"].events["purchase"].payout_share == Decimal("0.2")
    assert s.campaigns["c1"].click_window == 7 * 86400
    assert s.fx["USD"] == 1 and s.fx["EUR"] == Decimal("1.08")
    assert s.advertisers_by_token["adv-secret"].id == "acme"
    with pytest.raises(AttributeError):
        s.reporting_currency = "EUR"  # frozen


@pytest.mark.parametrize(
    "value,seconds",
    [("30s", 30), ("250ms", 0.25), ("2m", 120), ("1h", 3600), ("7d", 604800), ("1.5h", 5400)],
)
def test_durations(value, seconds):
    assert config.parse_duration(value, "k") == seconds


@pytest.mark.parametrize("value", ["30", "5 s", "-1s", "1w", 30, "", "s"])
def test_bad_durations(value):
    with pytest.raises(config.ConfigError, match="config error at k:"):
        config.parse_duration(value, "k")


def _mutations():
    def set_(path, value):
        def apply(d):
            *parents, last = path
            for p in parents:
                d = d[p]
            d[last] = value

        return apply

    return [
        ("unknown top-level", lambda d: d.update(extra={}), "extra"),
        ("unknown key", set_(["kafka", "bootstrap"], "x"), "kafka.bootstrap"),
        (
            "bad duration",
            set_(["attribution", "unknown_click_grace"], "30"),
            "attribution.unknown_click_grace",
        ),
        (
            "bad retry",
            set_(["callbacks", "retry_schedule"], ["5s", "soon"]),
            r"callbacks.retry_schedule\[1\]",
        ),
        (
            "unknown advertiser",
            set_(["campaigns", 0, "advertiser"], "nobody"),
            r"campaigns\[0\].advertiser",
        ),
        (
            "unknown destination macro",
            set_(["campaigns", 0, "destination"], "https://x.example/{nope}"),
            r"campaigns\[0\].destination",
        ),
        (
            "unknown callback macro",
            set_(["publishers", 0, "postback_url"], "https://x.example/{clik_id}"),
            r"publishers\[0\].postback_url",
        ),
        (
            "callback not http",
            set_(["publishers", 0, "postback_url"], "ftp://x.example/{click_id}"),
            r"publishers\[0\].postback_url",
        ),
        (
            "callback macro in host",
            set_(["publishers", 0, "postback_url"], "https://{sub1}.example/"),
            r"publishers\[0\].postback_url",
        ),
        (
            "callback bad port",
            set_(["publishers", 0, "postback_url"], "https://x.example:99999/"),
            r"publishers\[0\].postback_url",
        ),
        (
            "callback malformed macro",
            set_(["publishers", 0, "postback_url"], "https://x.example/{sub1"),
            r"publishers\[0\].postback_url",
        ),
        ("bad id", set_(["campaigns", 0, "id"], "has space"), r"campaigns\[0\].id"),
        (
            "duplicate id",
            lambda d: d["campaigns"].append(copy.deepcopy(d["campaigns"][0])),
            r"campaigns\[2\].id",
        ),
        (
            "currency not in fx",
            set_(["campaigns", 0, "currency"], "JPY"),
            r"campaigns\[0\].currency",
        ),
        (
            "payout and share",
            set_(["campaigns", 0, "events", "install", "payout_share"], 0.1),
            r"campaigns\[0\].events.install",
        ),
        (
            "negative payout",
            set_(["campaigns", 0, "events", "install", "payout"], -1),
            r"campaigns\[0\].events.install.payout",
        ),
        (
            "bad cidr",
            set_(["advertisers", 0, "allowed_ips"], ["10.0.0.0/33"]),
            r"advertisers\[0\].allowed_ips\[0\]",
        ),
        (
            "bad proxy cidr",
            set_(["ingress", "trusted_proxies"], ["nope"]),
            r"ingress.trusted_proxies\[0\]",
        ),
        ("no secrets", set_(["pipeline", "secrets"], []), "pipeline.secrets"),
        ("wrong type", set_(["kafka", "partitions"], "8"), "kafka.partitions"),
        ("bad method", set_(["publishers", 0, "method"], "PUT"), r"publishers\[0\].method"),
        (
            "bad signing secret",
            set_(["publishers", 0, "signing_secret"], "plain"),
            r"publishers\[0\].signing_secret",
        ),
        (
            "signing secret not base64",
            set_(["publishers", 0, "signing_secret"], "whsec_n0t*b64"),
            r"publishers\[0\].signing_secret",
        ),
        ("bad fx", set_(["fx", "EUR"], 0), "fx.EUR"),
        ("bad listen", set_(["ingress", "listen"], "8080"), "ingress.listen"),
        (
            "bad metrics listen",
            set_(["callbacks", "metrics_listen"], "9465"),
            "callbacks.metrics_listen",
        ),
        (
            "bad event name",
            set_(["campaigns", 0, "events", "Bad-Event"], {"payout": 1}),
            r"campaigns\[0\].events.Bad-Event",
        ),
        (
            "URL the callbacks' client cannot send",
            set_(["publishers", 0, "postback_url"], "http://127.0.0.1:28099\\@vm:28099/x"),
            r"publishers\[0\].postback_url",
        ),
        *(
            (
                f"non-canonical IPv4 {host}",
                set_(["publishers", 0, "postback_url"], f"http://{host}:9999/cb?e={{event}}"),
                r"publishers\[0\].postback_url",
            )
            for host in (
                "127.1",
                "0",
                "2130706433",
                "017700000001",
                "0177.0.0.1",
                "127.0.0.1.",
                "\uff11\uff12\uff17.0.0.1",
                "0x7f.0.0.1",
            )
        ),
    ]


@pytest.mark.parametrize("name,mutate,key", _mutations(), ids=[m[0] for m in _mutations()])
def test_config_errors_name_the_key(doc, name, mutate, key):
    mutate(doc)
    with pytest.raises(config.ConfigError, match=f"config error at {key}"):
        config.parse(doc)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(config.ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)


def test_cli_exits_with_the_key(tmp_path, capsys, doc):
    from pipeline import cli

    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('click_window = "7d"', 'click_window = "7 days"'))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ingress", "--config", str(bad)])
    assert exit_.value.code == 2
    assert "campaigns[0].click_window" in capsys.readouterr().err
