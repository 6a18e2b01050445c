"""Reading TOML tables with key paths in every error: the tools of `config.parse`.

Every problem raises `ConfigError` naming the key (`campaigns[0].click_window`),
so a bad config stops start-up instead of showing up later as a half-working
pipeline.
"""

from __future__ import annotations

import ipaddress
import os
import re
from decimal import Decimal, InvalidOperation
from typing import Any

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EVENT_RE = re.compile(r"^[a-z0-9_]{1,64}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

DESTINATION_MACROS = frozenset(
    {"click_id", "campaign_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5"}
)
CALLBACK_MACROS = DESTINATION_MACROS | {
    "conversion_id",
    "event",
    "txn_id",
    "revenue",
    "payout",
    "currency",
    "ctit",
    "click_ts",
    "conversion_ts",
    # empty for an attributed conversion; a reversal's callback: "reversed" and its kind
    "status",
    "reason",
}


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config error at {key}: {problem}")
        self.key = key


def parse_duration(value: Any, key: str) -> float:
    """`"30s"` -> 30.0 seconds. Units: ms s m h d."""
    match = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ConfigError(key, f"{value!r} is not a duration like '30s', '2m', '7d'")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class Reader:
    """Typed access to one TOML table that remembers the key path for errors."""

    def __init__(self, table: dict, path: str, allowed: set[str] | None):
        if not isinstance(table, dict):
            raise ConfigError(path, "must be a table")
        self.table, self.path = table, path
        if allowed is not None:
            for key in table:
                if key not in allowed:
                    raise ConfigError(self.key(key), "unknown key")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple, default: Any = ..., required: bool = False):
        if name not in self.table:
            if required or default is ...:
                raise ConfigError(self.key(name), "is required")
            return default
        value = self.table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def secret(self, name: str, default: Any = ..., required: bool = False) -> str:
        """A string that may be given as `env:NAME`: then the value of that environment
        variable, which must be set and non-empty."""
        return env_value(self.get(name, str, default, required), self.key(name))

    def ident(self, name: str) -> str:
        value = self.get(name, str, required=True)
        if not ID_RE.match(value):
            raise ConfigError(self.key(name), f"{value!r} is not an ID ([A-Za-z0-9_.-]{{1,64}})")
        return value

    def money(self, name: str) -> Decimal | None:
        if name not in self.table:
            return None
        raw = self.table[name]
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ConfigError(self.key(name), f"expected a number, got {raw!r}")
        try:
            # via str so 0.2 stays 0.2, not 0.200000000000000011...
            value = Decimal(str(raw))
        except InvalidOperation:
            raise ConfigError(self.key(name), f"{raw!r} is not a number") from None
        if not value.is_finite() or value < 0:
            raise ConfigError(self.key(name), f"{raw!r} must be a number >= 0")
        return value

    def networks(self, name: str, default: list) -> tuple:
        out = []
        for i, cidr in enumerate(self.get(name, list, default)):
            try:
                out.append(ipaddress.ip_network(cidr, strict=False))
            except (TypeError, ValueError):
                raise ConfigError(f"{self.key(name)}[{i}]", f"{cidr!r} is not a CIDR") from None
        return tuple(out)


def env_value(value: str, key: str) -> str:
    """`value`, or the environment variable it names as `env:NAME`."""
    if not isinstance(value, str) or not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(key, f"{value!r}: env: needs a variable name")
    found = os.environ.get(name)
    if not found:
        raise ConfigError(key, f"environment variable {name} is not set")
    return found


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    names.update({list: "a list", dict: "a table"})
    return names.get(kind, str(kind))


def listen(value: str, key: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"{value!r} is not host:port")
    return value
