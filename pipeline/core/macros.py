"""URL templates with `{name}` macros, filled with percent-encoded values.

Pure functions: used for campaign destinations (at click time) and publisher
callback URLs. A template is checked once at start-up (`check_url_template`),
so no URL ever leaves with a literal `{...}` in it.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlsplit

_FORMATTER = string.Formatter()
# what quote(value, safe="") leaves as it is (RFC 3986 unreserved characters)
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def template_fields(template: str) -> list[str]:
    """The macro names of a template, in order; raises ValueError on a malformed one."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as e:
        raise ValueError(f"malformed template: {e}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"malformed macro {{{name}}}")
        names.append(name)
    return names


def check_url_template(template: str, allowed: Iterable[str]) -> None:
    """Raise ValueError unless `template` is an http(s) URL using only `allowed` macros."""
    allowed = frozenset(allowed)
    unknown = [n for n in template_fields(template) if n not in allowed]
    if unknown:
        raise ValueError(f"unknown macro {{{unknown[0]}}}; known: {', '.join(sorted(allowed))}")
    probe = fill(template, {})
    parts = urlsplit(probe)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{template!r} is not an http(s) URL with a host")


@functools.lru_cache(maxsize=1024)
def _parsed(template: str) -> tuple[tuple[str, str | None], ...]:
    # templates come from the config: parse each once, not per click
    return tuple((literal, name) for literal, name, _, _ in _FORMATTER.parse(template))


def fill(template: str, values: Mapping[str, object]) -> str:
    """Fill macros with percent-encoded values; a macro without a value becomes empty."""
    out = []
    for literal, name in _parsed(template):
        out.append(literal)
        if name is not None:
            value = values.get(name)
            if value is None:
                continue
            text = value if isinstance(value, str) else str(value)
            # most values (IDs) need no escaping; quote() costs a microsecond to say so
            out.append(text if _UNRESERVED.fullmatch(text) else quote(text, safe=""))
    return "".join(out)
