"""`pipeline dev` as a user runs it: one subprocess, real HTTP, then Ctrl-C."""

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from pipeline.core import clickid
from pipeline.dev.kafka import die_with_parent, free_port
from pipeline.sink import migrations as ddl

from .conftest import EXAMPLE_CONFIG, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.clickhouse]


def http(method, url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture
def dev(tmp_path):
    ingress_port, ch_port, publisher_port = free_port(), free_port(), free_port()
    text = EXAMPLE_CONFIG.read_text()
    for old, new in {
        'embedded_listen = "127.0.0.1:9092"': 'embedded_listen = "127.0.0.1:0"',
        'embedded_listen = "127.0.0.1:8123"': f'embedded_listen = "127.0.0.1:{ch_port}"',
        'embedded_path = ".data/clickhouse"': f'embedded_path = "{tmp_path / "chdb"}"',
        'listen = "127.0.0.1:8080"': f'listen = "127.0.0.1:{ingress_port}"\n'
        f'spool_dir = "{tmp_path / "spool"}"',
        "127.0.0.1:9999": f"127.0.0.1:{publisher_port}",
    }.items():
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "dev.toml"
    config.write_text(text)
    log = open(tmp_path / "dev.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "dev",
            "--config",
            str(config),
            "--publisher",
            f"127.0.0.1:{publisher_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
        start_new_session=True,
    )

    def output():
        return (tmp_path / "dev.log").read_text()

    try:
        wait_until(
            lambda: "pipeline dev is up" in output() or proc.poll() is not None,
            90,
            message="pipeline dev banner",
        )
        assert proc.poll() is None, output()
        yield f"http://127.0.0.1:{ingress_port}", f"http://127.0.0.1:{ch_port}", proc, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_pipeline_dev_end_to_end(dev):
    ingress, clickhouse, proc, output = dev
    status, headers, _ = http("GET", f"{ingress}/click/c1?pub=net1&sub1=e2e")
    assert status == 302
    click_id = headers["X-Click-Id"]
    assert headers["Location"] == f"https://apps.example/app/id123?clickid={click_id}&pub=net1"

    status, _, body = http(
        "GET", f"{ingress}/postback?token=adv-secret&click_id={click_id}&event=install"
    )
    assert status == 200, body
    forged = clickid.issue(["someone-elses-secret"])
    status, _, body = http(
        "GET", f"{ingress}/postback?token=adv-secret&click_id={forged}&event=install"
    )
    assert (status, b"invalid_click_id" in body) == (400, True)
    status, _, body = http(
        "GET", f"{ingress}/postback?token=nope-nope-nope&click_id={click_id}&event=install"
    )
    assert (status, b"bad_token" in body) == (401, True)

    # read back the way the README tells a newcomer: plain HTTP on the ClickHouse port
    query = "SELECT+outcome+FROM+attribution.postbacks+FINAL+ORDER+BY+received_at+FORMAT+CSV"

    def outcomes():
        status, _, body = http("GET", f"{clickhouse}/?query={query}")
        lines = body.decode().split()
        return lines if status == 200 and len(lines) >= 3 else None

    rows = wait_until(outcomes, 30, message="postbacks in ClickHouse")
    assert rows == ['"accepted"', '"invalid_click_id"', '"bad_token"']
    client = ddl.connect(clickhouse)
    clicks = client.query("SELECT click_id, sub1 FROM attribution.clicks FINAL").result_rows
    client.close()
    assert clicks == [(click_id, "e2e")]

    # the whole loop: attributed by the worker, called back by the callbacks service
    wait_until(
        lambda: "publisher got GET /cb?click=e2e&event=install&payout=2" in output(),
        60,
        message="the install's callback at the demo publisher",
    )
    # the demo traffic generator against the running ingress
    config = next(p for p in proc.args if p.endswith("dev.toml"))
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "simulate",
            "--config",
            config,
            "--url",
            ingress,
            "--clicks",
            "40",
            "--seed",
            "7",
            "--skan",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stderr
    assert "click 200" in sim.stdout and "postback 200" in sim.stdout
    assert "40/40" in sim.stderr  # the progress bar ran to the end
    # SKAdNetwork postbacks signed with the example's test key: verified, and forwarded
    # to acme's skan_forward_url (the demo publisher)
    assert "skan 200" in sim.stdout
    wait_until(lambda: "publisher got POST /skan {" in output(), 60, message="a SKAN forward")
    client = ddl.connect(clickhouse)
    verified = "SELECT countIf(outcome = 'verified') FROM attribution.skan_postbacks FINAL"
    wait_until(lambda: client.query(verified).result_rows[0][0] >= 1, 30, message="SKAN rows")
    client.close()

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(60) == 0, output()
    assert "stopped." in output()
    # nothing left behind: the process group is empty
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
