"""The benchmark's run-queue meter (bench.stack.WaitMeter) on real processes."""

import os
import subprocess
import sys
import time

from bench.stack import WaitMeter, thread_waits, waits_text

BUSY = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"


def test_processes_that_outnumber_the_cores_wait_for_one():
    count = (os.cpu_count() or 1) + 1  # one more busy process than there are cores
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        time.sleep(0.3)  # past their start-up
        meter = WaitMeter({f"busy{i}": p.pid for i, p in enumerate(procs)} | {"idle": idle.pid})
        meter.start()
        time.sleep(0.8)
        waits = meter.stop()
    finally:
        for p in [*procs, idle]:
            p.kill()
            p.wait()
    busy = [waits[f"busy{i}"] for i in range(count)]
    # a core for every process but one: together they waited at least a fraction of the time
    assert sum(per_s for per_s, _ in busy) > 100
    assert all(per_run > 0 for _, per_run in busy)
    assert waits["idle"][0] < sum(per_s for per_s, _ in busy) / count
    assert waits_text(waits).startswith("waited for a CPU (ms a second, µs a wake-up): busy0 ")


def test_thread_waits_reads_every_thread_of_a_process():
    waits = thread_waits(os.getpid())
    assert os.getpid() in waits  # the main thread's id is the process id
    assert all(waited >= 0 and runs > 0 for waited, runs in waits.values())
