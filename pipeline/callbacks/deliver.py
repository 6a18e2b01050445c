"""The HTTP edge: send one callback request and say what came back.

One aiohttp session for the whole service. Its connector resolves names
through `GuardedResolver`, which checks every address with the SSRF rule and
hands exactly those addresses to the connector: the address checked is the
address connected to, with no second lookup. The URL keeps its host name, so
the Host header and the TLS server name are the publisher's. IP literals never
reach a resolver, so `Deliverer.send` checks them itself. Redirects are never
followed; proxies and cookies from the environment are never used.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from pipeline.core import delivery as policy
from pipeline.core import ssrf
from pipeline.core.callback import Request

log = logging.getLogger(__name__)


class GuardedResolver(AbstractResolver):
    """A resolver that refuses (raises `ssrf.Blocked`) names with a forbidden address."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        hosts = await self._inner.resolve(host, port, family)
        ssrf.check(host, [h["host"] for h in hosts])
        return hosts

    async def close(self) -> None:
        await self._inner.close()


def classify_error(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(kind, error) of a request that produced no response."""
    if isinstance(exc, ssrf.Blocked):
        return policy.BLOCKED, str(exc)
    if isinstance(exc, aiohttp.ClientConnectorDNSError) and isinstance(exc.__cause__, ssrf.Blocked):
        return policy.BLOCKED, str(exc.__cause__)
    if isinstance(exc, aiohttp.InvalidURL):
        return policy.PERMANENT, f"invalid URL: {exc}"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return policy.RETRYABLE, f"timeout after {timeout:g}s"
    if isinstance(exc, aiohttp.ClientError | OSError):
        # connection refused or reset, DNS failure, broken response: worth another try
        return policy.RETRYABLE, f"{type(exc).__name__}: {exc}"[:500]
    # anything else concerns this one request (a URL the client cannot send, say): it
    # fails for good, and every other callback goes on
    log.error("callback request failed unexpectedly", exc_info=exc)
    return policy.PERMANENT, f"{type(exc).__name__}: {exc}"[:500]


class Deliverer:
    """Sends requests; `send` never raises for what a publisher or network does."""

    def __init__(
        self,
        timeout: float,
        allow_private_networks: bool,
        resolver: AbstractResolver | None = None,  # the system's (threaded) by default
    ):
        self.timeout = timeout
        self.resolver = resolver
        self.client_timeout = aiohttp.ClientTimeout(total=timeout)
        self.allow_private = allow_private_networks
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=self.resolver if self.allow_private else GuardedResolver(self.resolver),
            limit=0,  # concurrency is bounded per publisher by the service
            ttl_dns_cache=10,  # only checked answers are ever cached
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(
        self,
        request: Request,
        logged_url: str,
        attempt_id: str = "",
        started_ms: int | None = None,
    ) -> policy.Attempt:
        """One attempt: at most `timeout` seconds from connect to status line.
        `attempt_id` and `started_ms` (default: now) are the attempt's, as its
        `sending` record gave them."""
        t0 = time.monotonic()
        if started_ms is None:
            started_ms = int(time.time() * 1000)
        status: int | None = None
        try:
            url = URL(request.url, encoded=True)
            if ssrf.noncanonical_ipv4(url.host or ""):
                raise ssrf.Blocked(f"{url.host!r} is not an IPv4 address in canonical form")
            if not self.allow_private:
                _check_literal(url.host or "")
            async with self.session.request(
                request.method,
                url,
                headers=request.headers,
                data=request.body or None,
                allow_redirects=False,
                timeout=self.client_timeout,
            ) as response:
                status = response.status
            kind, error = policy.classify_status(status)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is this attempt's outcome
            kind, error = classify_error(e, self.timeout)
        duration_ms = round((time.monotonic() - t0) * 1000)
        return policy.Attempt(kind, status, error, started_ms, duration_ms, logged_url, attempt_id)


def _check_literal(host: str) -> None:
    reason = _literal_refusal(host)
    if reason:
        raise ssrf.Blocked(reason)


@functools.lru_cache(maxsize=4096)
def _literal_refusal(host: str) -> str | None:
    """Why an IP-literal host is refused (None for names: the resolver checks them).
    A pure function of the text, so cached: no parse and no exception per request."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    try:
        ssrf.check(host, [host])
    except ssrf.Blocked as e:
        return str(e)
    return None
