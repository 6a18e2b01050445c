"""The benchmark's infrastructure: one Tansu broker, one embedded ClickHouse,
config files, and the processes under test.

Everything listens on 127.0.0.1 on free ports. Every child gets the Linux
parent-death signal, and `Stack.close()` stops whatever is still running, so a
benchmark that fails half-way leaves nothing behind. Each measurement gets its
own topic prefix and database from `Stack.config()`, so runs never see each
other's data.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from bench import profile
from pipeline import config
from pipeline.dev.kafka import EmbeddedKafka, die_with_parent, free_port, wait_for_port
from tests.apache_kafka import ApacheKafka  # the reference broker of the tests

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "deploy" / "example.toml"


class Proc:
    """A child process with its log file; `stop()` is its stop signal, then SIGKILL."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, stop_signal: int = signal.SIGTERM
    ):
        self.name, self.log_path, self.stop_signal = name, log_path, stop_signal
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        """Raise if the process died: a benchmark of a dead process measures nothing."""
        if not self.alive():
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


class Stack:
    """Tansu + embedded ClickHouse for one benchmark run, plus its children."""

    def __init__(self, workdir: Path, profile_dir: Path | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.profile_dir = profile_dir
        self.kafka = EmbeddedKafka(f"127.0.0.1:{free_port()}", workdir / "tansu.log")
        self.clickhouse_url = ""
        self.clickhouse: Proc | None = None
        self._procs: list[Proc] = []

    def start(self) -> Stack:
        self.kafka.start()
        port = free_port()
        self.clickhouse = ch = self.spawn(
            "clickhouse",
            [
                sys.executable,
                "-m",
                "pipeline.dev.clickhouse",
                "--path",
                str(self.workdir / "chdb"),
                "--listen",
                f"127.0.0.1:{port}",
            ],
        )
        wait_for_port("127.0.0.1", port, 60, ch.popen)
        self.clickhouse_url = f"http://127.0.0.1:{port}"
        return self

    def fresh_broker(self, reference: bool = False) -> None:
        """Replace the broker with a new, empty one (for what follows). Late in a full
        run, holding the earlier figures' topics and millions of records, Tansu
        answered much slower: a bare produce -> consume round trip at about 2,400/s
        had a p99 of 252 ms there, 30 ms on a fresh broker. With `reference`, the new
        broker is Apache Kafka (KRaft, from the jars the tests use: java and mvn)."""
        self.kafka.stop()
        stamp = int(time.time())
        if reference:
            workdir = self.workdir / f"apache-kafka-{stamp}"
            workdir.mkdir(parents=True, exist_ok=True)
            self.kafka = ApacheKafka(workdir)
        else:
            log = self.workdir / f"tansu-{stamp}.log"
            self.kafka = EmbeddedKafka(f"127.0.0.1:{free_port()}", log)
        self.kafka.start()

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap_servers

    def spawn(self, name: str, argv: list[str], stop_signal: int = signal.SIGTERM) -> Proc:
        proc = Proc(name, argv, self.workdir / f"{name}.log", stop_signal)
        self._procs.append(proc)
        return proc

    def pipeline(self, component: str, config_path: Path, name: str | None = None) -> Proc:
        """`python -m pipeline <component> --config <file>`, as an operator runs it."""
        argv = [
            sys.executable,
            "-m",
            "pipeline",
            "--log-level",
            "WARNING",
            component,
            "--config",
            str(config_path),
        ]
        return self.spawn(name or component, argv)

    def profile(self, proc: Proc, seconds: float | None = None, tag: str = "") -> None:
        """With profiling on, sample `proc` from now for `seconds` (or until it
        exits) into <profile_dir>/<name><tag>.folded; else nothing."""
        if self.profile_dir is None:
            return
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{proc.name}{tag}.folded"
        # py-spy writes what it sampled on SIGINT (Ctrl-C), and when its target exits
        argv = profile.command(proc.pid, out, seconds)
        self.spawn(f"py-spy-{proc.name}{tag}", argv, stop_signal=signal.SIGINT)

    def config(
        self, name: str, replace: dict[str, str] | None = None, **sections: str
    ) -> tuple[Path, config.Settings]:
        """The example config with a fresh topic prefix and database, pointed at
        this stack. `replace` substitutes text (a publisher's address),
        `sections` replace whole tables (`worker='store = "memory://"'`). The
        ingress and the worker's web server get free ports."""
        run = f"b{uuid.uuid4().hex[:8]}"
        text = EXAMPLE_CONFIG.read_text()
        for old, new in {
            'bootstrap_servers = "embedded"': (
                f'bootstrap_servers = "{self.bootstrap}"\nreplication_factor = 1'
            ),
            'url = "embedded"': f'url = "{self.clickhouse_url}"',
            'topic_prefix = "attribution."': f'topic_prefix = "{run}."',
            'database = "attribution"': f'database = "{run}"',
            **(replace or {}),
        }.items():
            if old not in text:
                raise RuntimeError(f"deploy/example.toml changed: no {old!r} to replace")
            text = text.replace(old, new)
        data = self.workdir / run
        defaults = {
            "ingress": f'listen = "127.0.0.1:{free_port()}"\ntrusted_proxies = []\n'
            f'spool_dir = "{data / "spool"}"',
            "worker": f'web_listen = "127.0.0.1:{free_port()}"\ndata_dir = "{data / "worker"}"',
        }
        for table, body in {**defaults, **sections}.items():
            text = re.sub(rf"^\[{table}\]\n(?:[^\[\n].*\n|\n)*", "", text, flags=re.M)
            text = f"[{table}]\n{body}\n\n" + text
        path = self.workdir / f"{name}-{run}.toml"
        path.write_text(text)
        return path, config.load(path)

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        """Stop every child (newest first), then the broker. Idempotent."""
        while self._procs:
            self._procs.pop().stop()
        self.kafka.stop()


def wait_http(url: str, timeout: float, proc: Proc | None = None, status: int = 200) -> None:
    """Poll `url` until it answers `status`; raise if `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == status:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout:.0f}s")


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/<pid>/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU cores used by named processes between `start()` and `stop()`: on a
    2-core machine, whether the process under test had a core to itself.
    `children=True` adds the children this process waited for meanwhile
    (a load generator run with subprocess.run) as "load generator"."""

    def __init__(self, pids: dict[str, int], children: bool = False):
        self.pids, self.children = pids, children
        self._start: tuple[float, dict[str, float], float] | None = None

    def start(self) -> CpuMeter:
        used = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._start = (time.monotonic(), used, _children_cpu())
        return self

    def stop(self) -> dict[str, float]:
        assert self._start is not None, "start() first"
        began, used, children = self._start
        wall = time.monotonic() - began
        cores = {name: (cpu_seconds(pid) - used[name]) / wall for name, pid in self.pids.items()}
        if self.children:
            cores["load generator"] = (_children_cpu() - children) / wall
        return {name: round(value, 2) for name, value in cores.items()}


def thread_waits(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of a process: (nanoseconds it waited on a run queue for a CPU,
    times it was given one), from /proc/<pid>/task/<tid>/schedstat."""
    waits = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            _, waited, runs = task.joinpath("schedstat").read_text().split()
            waits[int(task.name)] = (int(waited), int(runs))
    return waits


class WaitMeter:
    """How long named processes waited for a CPU between `start()` and `stop()`:
    the time their threads were ready to run but every core was taken (the
    kernel's run-queue wait), per second and per time they got a CPU. Threads
    that did not live through the whole span are left out."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self._start: tuple[float, dict[str, dict[int, tuple[int, int]]]] | None = None

    def start(self) -> WaitMeter:
        self._start = (time.monotonic(), {n: thread_waits(p) for n, p in self.pids.items()})
        return self

    def stop(self) -> dict[str, tuple[float, float]]:
        """Per process: (ms waited a second, µs waited a time it got a CPU)."""
        assert self._start is not None, "start() first"
        began, before = self._start
        wall = time.monotonic() - began
        waits = {}
        for name, pid in self.pids.items():
            waited = runs = 0
            for tid, (w, r) in thread_waits(pid).items():
                if tid in before[name]:
                    waited += w - before[name][tid][0]
                    runs += r - before[name][tid][1]
            waits[name] = (waited / 1e6 / wall, waited / 1e3 / runs if runs else 0.0)
        return waits


def waits_text(waits: dict[str, tuple[float, float]]) -> str:
    return "waited for a CPU (ms a second, µs a wake-up): " + ", ".join(
        f"{name} {per_s:.0f} ({per_run:.0f})" for name, (per_s, per_run) in waits.items()
    )


def cores_text(cores: dict[str, float]) -> str:
    return "CPU cores used: " + ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
