"""`pipeline dev`'s supervisor over real child processes (small Python scripts): a
crashing child is restarted with a doubling backoff and given up after `CRASHES`
exits within `CRASH_WINDOW` with its last lines; exit 2 is given up at once."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from pipeline.dev import supervisor

CRASHING = "import sys; print('starting'); print('boom: no database', file=sys.stderr); sys.exit(3)"

# answers 200 on /healthz once listening, like a component's health server
SERVING = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


async def test_a_crashing_child_is_restarted_with_backoff_then_given_up(caplog):
    caplog.set_level(logging.ERROR, logger=supervisor.__name__)
    changes: list[bool] = []
    child = supervisor.Child("worker", [sys.executable, "-c", CRASHING], lambda: None)
    child.changed = lambda: changes.append(child.up)

    with pytest.raises(supervisor.CrashLoop) as raised:
        await asyncio.wait_for(child.run(), 120)

    failure = raised.value
    assert failure.name == "worker"
    assert failure.why == "exited 5 times within 60s (last code 3)"
    assert failure.last_lines[-2:] == ["starting", "boom: no database"]
    restarts = [r.getMessage() for r in caplog.records]
    assert restarts == [
        "worker exited with 3; restarting in 0.5s",
        "worker exited with 3; restarting in 1.0s",
        "worker exited with 3; restarting in 2.0s",
        "worker exited with 3; restarting in 4.0s",
    ]
    # up when started (no health URL), down at each exit
    assert changes == [True, False] * supervisor.CRASHES


async def test_a_configuration_error_is_given_up_at_once(caplog):
    caplog.set_level(logging.ERROR, logger=supervisor.__name__)
    script = "import sys; print(\"pipeline: worker.store needs the 'rocksdb' extra\"); sys.exit(2)"
    child = supervisor.Child("worker", [sys.executable, "-c", script], lambda: None)

    with pytest.raises(supervisor.CrashLoop) as raised:
        await asyncio.wait_for(child.run(), 60)

    assert raised.value.why == "exited with 2"
    assert raised.value.last_lines == ["pipeline: worker.store needs the 'rocksdb' extra"]
    assert not caplog.records  # no restart
