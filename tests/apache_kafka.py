"""A reference Apache Kafka broker for the tests, next to the embedded Tansu one.

The broker's jars come from Maven Central through `mvn` (see deploy/apache-kafka/pom.xml)
and are cached per Kafka version, so only the first run on a machine fetches them
(about 50 MB). The broker runs in KRaft combined mode (broker + controller in one JVM),
listens on 127.0.0.1 only, and dies with the process that started it.

    broker = ApacheKafka(tmp_path)
    bootstrap = broker.start()      # "127.0.0.1:<port>"
    ...
    broker.stop()
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import fcntl
import hashlib
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

# Keep in step with <kafka.version> in deploy/apache-kafka/pom.xml (checked in _check_pom).
KAFKA_VERSION = "3.9.2"

REPO_ROOT = Path(__file__).resolve().parent.parent
POM = REPO_ROOT / "deploy" / "apache-kafka" / "pom.xml"

MIN_JAVA = 11  # Kafka 3.9's broker needs Java 11+; 17 is what the machines have
FETCH_TIMEOUT = 900.0  # seconds for the one-off `mvn` fetch
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL
LOG_NAME = "broker.log"
PORT_ATTEMPTS = 3  # starts with fresh ports when a port picked free was taken meanwhile

# The JVM as Kafka's own scripts start it: the reference broker is Kafka as shipped.
# kafka-run-class.sh's performance options (its -XX:MaxInlineLevel=15 is left out: the
# default since JDK 14), kafka-server-start.sh's heap for the broker and
# kafka-run-class.sh's for the storage tool. The broker's heap used to start at 64 MB
# (at most 512 MB) around some 160 MB that stay live (an idle broker holds 147 MB of
# byte arrays; the log cleaner's dedupe buffer alone is 128 MB): under the latency
# load G1 collected the young generation every 0.6-1.2 s, and in two of three runs ran
# a concurrent mark cycle every 6-7 s. With 1 GB from the start: every 4-6 s, and no
# concurrent cycle after start-up (bench: latency, three trios each, 2026-11-26;
# bench/NOTES.md, "The reference broker's JVM").
JVM_PERFORMANCE = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
SERVER_HEAP = ("-Xmx1G", "-Xms1G")
TOOL_HEAP = ("-Xmx256M",)

_PR_SET_PDEATHSIG = 1


class _Spawner:
    """Runs calls on one daemon thread that lives as long as the process does.

    The JVMs are forked from this thread, never from the caller's: PR_SET_PDEATHSIG fires
    when the *thread* that forked the child exits, so a broker started from a short-lived
    worker thread (e.g. asyncio.to_thread in an async fixture) would die with that thread.
    (A ThreadPoolExecutor's worker would not do either: it is joined at interpreter exit,
    before the atexit hooks that stop the brokers gracefully run.)
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kafka-spawn", daemon=True)
                self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args, kwargs = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)


_spawner = _Spawner()


class _PortTaken(RuntimeError):
    """The broker could not bind a listener port."""


def default_cache_dir(version: str = KAFKA_VERSION) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "postback-pipeline" / "apache-kafka" / version


def _java() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # `openjdk version "17.0.15" 2025-04-15`, `java version "1.8.0_392"`
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _check_pom() -> None:
    text = POM.read_text()
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", text)
    if not m or m.group(1).strip() != KAFKA_VERSION:
        found = m.group(1).strip() if m else None
        raise RuntimeError(
            f"{POM} pins kafka.version {found!r} but tests/apache_kafka.py says "
            f"{KAFKA_VERSION!r}: keep them in step"
        )


def _libs_ready(libs: Path) -> bool:
    marker = libs / ".complete"
    try:
        return marker.read_text().strip() == _pom_digest()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_cluster_id() -> str:
    """What `kafka-storage.sh random-uuid` prints: a UUID as 22 chars of url-safe base64.

    Like Kafka's Uuid.randomUuid(), never one that starts with "-": the command line would
    read it as an option (`-t -abc...`), and 1 id in 64 would fail to format.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _log_excerpt(path: Path, errors: int = 20, tail: int = 40) -> str:
    """The broker log's ERROR/FATAL lines (the cause is often far above the end), then its tail."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    out = []
    bad = [ln for ln in lines[:-tail] if re.search(r"\b(ERROR|FATAL)\b|Exception|Error:", ln)]
    if bad:
        out += [f"--- ERROR lines of {path} ---", *bad[:errors]]
    out += [f"--- last lines of {path} ---", *lines[-tail:]]
    return "\n".join(out)


def _api_versions(port: int, timeout: float = 2.0) -> None:
    """One ApiVersions v0 request on a fresh connection; raises unless the broker answers it."""
    client_id = b"apache-kafka-probe"
    correlation_id = 0x5EED
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(struct.pack(">i", len(body)) + body)
        header = _recv_exactly(conn, 4)
        (size,) = struct.unpack(">i", header)
        payload = _recv_exactly(conn, size)
    got_id, error_code = struct.unpack(">ih", payload[:6])
    if got_id != correlation_id or error_code != 0:
        raise ConnectionError(f"ApiVersions answered {got_id=} {error_code=}")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buf += chunk
    return buf


def _die_with_parent(prctl, parent_pid: int) -> None:
    """preexec_fn: SIGKILL the child when the thread that forked it goes away."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class ApacheKafka:
    """A single-node Apache Kafka broker in KRaft mode on loopback, from Maven Central jars
    (cached)."""

    version = KAFKA_VERSION

    def __init__(self, workdir: Path, port: int = 0, cache_dir: Path | None = None):
        self.workdir = Path(workdir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.libs = self.cache_dir / "libs"
        self.port = port
        self._auto_port = port == 0
        self._log_offset = 0
        self.controller_port = 0
        self.cluster_id = _random_cluster_id()
        self.log_path = self.workdir / LOG_NAME
        self.properties_path = self.workdir / "server.properties"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self.fetch_seconds: float | None = None  # set when this instance ran the mvn fetch
        atexit.register(self.stop)

    # -- availability -------------------------------------------------------------------

    @staticmethod
    def unavailable_reason(cache_dir: Path | None = None) -> str | None:
        """Why this machine cannot run the broker (for pytest.skip), or None if it can."""
        java = _java()
        if java is None:
            return "java not found (install a JDK 17, or set JAVA_HOME)"
        major = _java_major(java)
        if major is None:
            return f"{java} -version did not run or could not be read"
        if major < MIN_JAVA:
            return f"Apache Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+, {java} is Java {major}"
        if not POM.is_file():
            return f"{POM} not found"
        libs = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "libs"
        if not _libs_ready(libs) and shutil.which("mvn") is None:
            return f"mvn not found (needed once to fetch the Kafka jars into {libs})"
        return None

    @property
    def bootstrap_servers(self) -> str:
        if not self.port:
            raise RuntimeError("ApacheKafka.bootstrap_servers: the broker was not started")
        return f"127.0.0.1:{self.port}"

    # -- jars ---------------------------------------------------------------------------

    def ensure_jars(self) -> Path:
        """The directory of broker jars; fetched with mvn under a lock if not cached yet."""
        _check_pom()
        if _libs_ready(self.libs):
            return self.libs
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be fetching
            try:
                if not _libs_ready(self.libs):
                    self._fetch_jars()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self.libs

    def _fetch_jars(self) -> None:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(f"mvn not found: cannot fetch the Kafka jars into {self.libs}")
        partial = self.cache_dir / f"libs.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}", "-DincludeScope=runtime",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            out = subprocess.run(
                cmd,
                cwd=self.cache_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=FETCH_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"mvn did not fetch the Kafka jars in {FETCH_TIMEOUT:.0f}s") from e
        if out.returncode != 0 or not any(partial.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            shutil.rmtree(partial, ignore_errors=True)
            tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
            raise RuntimeError(
                f"fetching the Kafka jars failed (exit {out.returncode}): {' '.join(cmd)}\n{tail}"
            )
        (partial / ".complete").write_text(_pom_digest() + "\n")
        if self.libs.exists():  # stale: the pom changed since it was fetched
            stale = self.cache_dir / f"libs.stale-{os.getpid()}"
            self.libs.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        partial.rename(self.libs)
        self.fetch_seconds = time.monotonic() - started

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 120) -> str:
        """Start the broker and wait until it answers a metadata request; returns bootstrap."""
        if self.proc is not None and self.proc.poll() is None:
            return self.bootstrap_servers
        deadline = time.monotonic() + timeout
        java = _java()
        if java is None:
            raise RuntimeError("java not found: cannot start Apache Kafka")
        libs = self.ensure_jars()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # ports are kept across stop()/start() so a restart has the same bootstrap address
            self.port = self.port or _free_port()
            self.controller_port = self.controller_port or _free_port()
            while self.controller_port == self.port:
                self.controller_port = _free_port()
            try:
                self._launch(java, f"{libs}/*", deadline, timeout)
                return self.bootstrap_servers
            except _PortTaken:
                # a port picked free was taken before the JVM bound it (the kernel hands the
                # same ephemeral ports to outgoing connections): pick new ones and go again
                if attempt == PORT_ATTEMPTS:
                    raise
                if self._auto_port:
                    self.port = 0
                self.controller_port = 0
        raise AssertionError("unreachable")

    def _launch(self, java: str, classpath: str, deadline: float, timeout: float) -> None:
        self._write_config()
        self._log_file = open(self.log_path, "ab")
        self._log_offset = self._log_file.tell()
        try:
            fmt_cmd = [
                java, *self._jvm_opts(TOOL_HEAP), "-cp", classpath,
                "kafka.tools.StorageTool", "format", "--ignore-formatted",
                "-t", self.cluster_id, "-c", str(self.properties_path),
            ]  # fmt: skip
            fmt = subprocess.run(
                fmt_cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                timeout=max(10.0, deadline - time.monotonic()),
                check=False,
            )
            if fmt.returncode != 0:
                raise self._failure(f"formatting the KRaft storage failed (exit {fmt.returncode})")

            cmd = [
                java, *self._jvm_opts(SERVER_HEAP), "-cp", classpath,
                "kafka.Kafka", str(self.properties_path),
            ]  # fmt: skip
            parent_pid = os.getpid()
            # looked up before the fork: the child only calls it
            prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
            self.proc = _spawner.submit(
                subprocess.Popen,
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: _die_with_parent(prctl, parent_pid),
            ).result()
            self._wait_ready(deadline, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after a grace period); idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_excerpt(self) -> str:
        """The broker log's ERROR lines and last lines, for failure messages."""
        return _log_excerpt(self.log_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> ApacheKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------

    def _jvm_opts(self, heap: tuple[str, ...]) -> list[str]:
        return [
            *heap,
            *JVM_PERFORMANCE,
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j.configuration={(self.workdir / 'log4j.properties').as_uri()}",
            f"-Dkafka.logs.dir={self.workdir}",
        ]

    def _write_config(self) -> None:
        data = self.workdir / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        self.properties_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        # the broker's own log goes to stdout, which start() sends to broker.log
        (self.workdir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.org.apache.kafka.clients=WARN\n"
            "log4j.logger.state.change.logger=WARN\n"
        )

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        last_error: BaseException | None = None
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                what = f"the broker exited with code {code} while starting"
                if self._bind_failed():
                    raise self._failure(what, _PortTaken)
                raise self._failure(what)
            if time.monotonic() > deadline:
                raise self._failure(
                    f"the broker did not answer a metadata request within {timeout:.0f}s "
                    f"(last error: {last_error!r})"
                )
            try:
                # a raw ApiVersions round trip first: cheap, and quiet while the listener is
                # bound but not serving yet (aiokafka logs every failed connection)
                _api_versions(self.port)
                if _spawner.submit(asyncio.run, self._probe()).result(timeout=30):
                    return
                last_error = RuntimeError("node 1 not in the cluster metadata yet")
            except Exception as e:  # not up yet
                last_error = e
            time.sleep(0.2)

    async def _probe(self) -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{self.port}", request_timeout_ms=5000
        )
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
        finally:
            await admin.close()
        return any(b["node_id"] == 1 for b in cluster["brokers"])

    def _bind_failed(self) -> bool:
        """Whether this launch failed to bind a port that start() may pick anew."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                log = f.read().decode(errors="replace")
        except OSError:
            return False
        if "Address already in use" not in log:
            return False
        taken = {int(p) for p in re.findall(r"failed to bind to 127\.0\.0\.1:(\d+)", log)}
        return self._auto_port or self.port not in taken

    def _failure(self, what: str, kind: type[RuntimeError] = RuntimeError) -> RuntimeError:
        with contextlib.suppress(Exception):
            if self._log_file is not None:
                self._log_file.flush()
        return kind(f"Apache Kafka {KAFKA_VERSION}: {what}\n{_log_excerpt(self.log_path)}")
