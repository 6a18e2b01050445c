"""The SSRF guard end to end: every address class of the contract, IPv4 in every
notation, IPv6 forms, mapped and embedding addresses, names resolving to
forbidden addresses (through a resolver the test controls), redirects. Each is
refused at start-up (the config) or `blocked` at send, and no connection is ever
made: loopback listeners count what reaches them, and every connect of the
event loop is recorded and, unless to loopback, refused before it leaves."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tomllib

import pytest
from aiohttp.abc import AbstractResolver

from pipeline import config
from pipeline.callbacks.deliver import Deliverer
from pipeline.core import delivery as policy
from pipeline.core.callback import Request

from .conftest import EXAMPLE_CONFIG

# IPv4, every class the contract names (the port is the loopback listener's)
CLASSES_V4 = [
    "0.0.0.0", "127.0.0.1", "127.255.255.254", "10.0.0.1", "10.255.255.255", "172.16.0.1",
    "172.31.255.254", "192.168.1.1", "169.254.169.254", "100.64.0.1", "192.0.0.8",
    "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
]  # fmt: skip
# 127.0.0.1 and 10.0.0.1 as inet_aton, WHATWG and others read them
NOTATIONS_V4 = [
    "2130706433", "0x7f000001", "0X7F000001", "017700000001", "0177.0.0.1", "0x7f.0.0.1",
    "0x7f.0x0.0x0.0x1", "127.1", "127.0.1", "127.000.000.001", "0127.0.0.1", "127.0.0.1.",
    "167772161", "10.1", "012.0.0.1", "0xa.0.0.1", "\uff11\uff12\uff17.0.0.1",
    "\u0661\u0662\u0667.0.0.1", "0x7f.1", "00000127.0.0.1",
]  # fmt: skip
V6 = [
    "::1", "0:0:0:0:0:0:0:1", "::", "fe80::1", "fe80::1%25lo", "fc00::1", "fd12:3456::1",
    "fec0::1", "ff02::1", "ff05::2", "::ffff:127.0.0.1", "::ffff:7f00:1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0.0.0.0", "::127.0.0.1",
    "64:ff9b::127.0.0.1", "64:ff9b::10.0.0.1", "64:ff9b:1::a00:1", "2002:7f00:1::1",
    "2002:a00:1::1", "2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:db8::1", "3fff::1",
    "100::1", "5f00::1", "::ffff:0:7f00:1",
]  # fmt: skip
# names the test's resolver answers, and the system's localhost
NAMES = {
    "loopback.test": ["127.0.0.1"],
    "loopback6.test": ["::1"],
    "private.test": ["10.0.0.7"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mixed.test": ["93.184.215.14", "10.0.0.7"],  # one bad answer blocks the name
    "mixed6.test": ["2606:4700::1111", "fd00::1"],
    "cgnat.test": ["100.64.1.1"],
    "nat64.test": ["64:ff9b::a00:1"],
    "unspecified.test": ["0.0.0.0"],
    "localhost.": ["127.0.0.1"],  # fully qualified: what a resolver that takes it answers
}


class Resolver(AbstractResolver):
    """Answers NAMES; every other name is the system's (localhost)."""

    def __init__(self):
        from aiohttp.resolver import ThreadedResolver

        self.system = ThreadedResolver()
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in NAMES:
            return await self.system.resolve(host, port, family)
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in NAMES[host]
        ]

    async def close(self):
        await self.system.close()


class Listeners:
    """Loopback TCP listeners (IPv4 and IPv6, one port) counting connections."""

    def __init__(self):
        self.connections = 0
        self.servers: list[asyncio.AbstractServer] = []
        self.port = 0

    async def start(self) -> None:
        async def accepted(reader, writer):
            self.connections += 1
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self.servers.append(server)
        with contextlib.suppress(OSError):  # no IPv6 loopback here: IPv4 counts all
            self.servers.append(await asyncio.start_server(accepted, "::1", self.port))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def connects(monkeypatch):
    """Every address the event loop's sockets connect to; those not on loopback are
    refused before a packet leaves (a guard that let one through fails the test)."""
    loop = asyncio.get_running_loop()
    seen: list[tuple] = []
    original = loop.sock_connect

    async def sock_connect(sock, address):
        seen.append(address)
        host = address[0].split("%", 1)[0]
        if host not in ("127.0.0.1", "::1"):
            raise OSError(f"test: refused a connection to {host}")
        return await original(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    return seen


@pytest.fixture
async def listeners():
    found = Listeners()
    await found.start()
    yield found
    await found.stop()


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def config_refuses(url: str) -> bool:
    """Whether start-up refuses a publisher with this postback_url."""
    doc = tomllib.loads(EXAMPLE_CONFIG.read_text())
    doc["callbacks"]["allow_private_networks"] = False
    doc["publishers"][0]["postback_url"] = url
    try:
        config.parse(doc)
    except config.ConfigError:
        return True
    return False


async def send(url: str, allow_private: bool = False) -> policy.Attempt:
    deliverer = Deliverer(2.0, allow_private, resolver=Resolver())
    await deliverer.start()
    try:
        return await deliverer.send(Request("GET", url, {}, b""), url)
    finally:
        await deliverer.close()


CASES = (
    [(h, "class") for h in CLASSES_V4]
    + [(h, "notation") for h in NOTATIONS_V4]
    + [(h, "ipv6") for h in V6]
    + [(h, "name") for h in [*NAMES, "localhost", "LOCALHOST"]]
)


@pytest.mark.parametrize("host,kind", CASES, ids=[f"{k}:{h}" for h, k in CASES])
async def test_refused_at_start_up_or_blocked_and_never_connected(host, kind, listeners, connects):
    for scheme in ("http", "https"):
        url = f"{scheme}://{url_host(host)}:{listeners.port}/cb?x=1"
        refused = config_refuses(url)
        if kind == "notation":
            assert refused, f"{url} must be refused at start-up"
        attempt = await send(url)
        # whatever start-up said, a request is never made: blocked (or, for what no
        # client can parse, failed for good)
        assert attempt.kind in (policy.BLOCKED, policy.PERMANENT), (url, attempt)
        assert refused or attempt.kind == policy.BLOCKED, (url, attempt)
    assert connects == [] and listeners.connections == 0


async def test_a_redirect_is_never_followed(listeners, connects):
    # allowed to reach loopback (development): the 302's target is still never asked
    attempt = await send(f"http://127.0.0.1:{listeners.port}/cb", allow_private=True)
    assert (attempt.kind, attempt.status_code) == (policy.PERMANENT, 302)
    assert listeners.connections == 1
    assert [a[1] for a in connects] == [listeners.port]  # not port 1, the Location


async def test_a_public_name_passes_the_guard(connects):
    # the control: a name with only global answers reaches the connect (refused here,
    # so nothing leaves the machine): the guard blocks by address, not by accident
    NAMES["public.test"] = ["93.184.215.14"]
    try:
        attempt = await send("http://public.test:9/cb")
    finally:
        del NAMES["public.test"]
    assert attempt.kind == policy.RETRYABLE  # a connection error, worth another try
    assert [a[0] for a in connects] == ["93.184.215.14"]
