"""Secrets kept out of rows and log lines, and tokens compared without leaking them. Pure.

A `Secrets` knows every configured secret value (advertiser tokens, click-ID
secrets, signing secrets, passwords in URLs) and hides each of them wherever it
appears, by value, whatever parameter, header or sentence carries it: a JSON
body sent as text/plain becomes one form parameter whose name holds the token,
and `&amp;token=` or `Token=` carry it under other names. Parameter names that
look like credentials are hidden by name as well.

`TokenIndex` finds an advertiser by token through a keyed hash (HMAC-SHA256
under a key drawn at start-up): the lookup's time depends on the digest, which
a caller cannot predict, never on how much of a token it guessed right.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

MASK = "***"
# names that say "credential": token, api_key, secret, password, ... in any case, with
# any prefix (`amp;token` is `&amp;token=` read as a query)
_SECRET_NAME = re.compile(r"(token|secret|passw(or)?d|api[_-]?key|signature)$", re.I)
_MIN_LENGTH = 4  # shorter values would hide ordinary text; configured secrets are 8+
# in any line of text, the value after a credential-like name (a request line, a URL)
_NAMED_VALUE = re.compile(
    r"((?:token|secret|passw(?:or)?d|api[_-]?key)[\"']?\s*(?:=|:|%3D)\s*[\"']?)([^&\s\"',;}]+)",
    re.I,
)


def secret_name(name: str) -> bool:
    """Whether a parameter called `name` holds a credential (shown as ***)."""
    return bool(_SECRET_NAME.search(name.strip()))


class Secrets:
    """Every configured secret value, hidden in any text (see the module docstring)."""

    def __init__(self, values: Iterable[str] = ()):
        forms: set[str] = set()
        for value in values:
            if not isinstance(value, str) or len(value) < _MIN_LENGTH:
                continue
            # as written, as JSON writes it, as a URL or a form encodes it
            forms |= {value, json.dumps(value)[1:-1], quote(value, safe=""), quote_plus(value)}
            forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
        self.values = frozenset(forms)
        # longest first: a secret that contains another is hidden whole
        alternatives = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def hide(self, text: str) -> str:
        """`text` with every configured secret replaced by ***."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def hide_named(self, text: str) -> str:
        """`hide`, and also any value written after a credential-like name
        (`token=...`, `"secret": "..."`): for free text such as a log line."""
        return _NAMED_VALUE.sub(lambda m: m.group(1) + MASK, self.hide(text))

    def params(self, params: Mapping[str, object]) -> dict[str, object]:
        """The parameters as they may be stored: credential-like names and every
        configured secret, in names or values, hidden (non-strings kept as they are,
        unless a secret hides in their JSON)."""
        shown: dict[str, object] = {}
        for name, value in params.items():
            if isinstance(name, str):
                if secret_name(name):
                    value = MASK
                name = self.hide(name)
            if isinstance(value, str):
                value = self.hide(value)
            elif self and value is not None and not isinstance(value, bool | int | float):
                text = json.dumps(value, ensure_ascii=False, default=str)
                if self.hide(text) != text:
                    value = MASK
            shown[name] = value
        return shown


NONE = Secrets()


class TokenIndex:
    """Advertisers by token, looked up through a keyed hash (see the module docstring)."""

    def __init__(self, by_token: Mapping[str, object], key: bytes | None = None):
        self._key = key or os.urandom(32)
        self._by_digest = {self._digest(token): item for token, item in by_token.items()}

    def _digest(self, token: str) -> bytes:
        data = token.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def get(self, token: str):
        """The item whose token is `token`, or None; the same work whichever it is."""
        return self._by_digest.get(self._digest(token))
