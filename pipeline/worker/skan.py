"""The SKAdNetwork stage: every report evaluated, verified copies deduplicated.

The handler (pipeline/worker/app.py) calls `on_report` with the partition of a
skan-reports record and its decoded value; the table is a plain mapping (a
Faust table in production, a dict in tests) and every evaluated postback goes
to `emit`, whatever its outcome. It never awaits.

skan-reports is keyed by transaction-id (`core.skan.report`), so every copy of a
transaction's postbacks reaches the same partition, in the order the ingress
published them. A verified postback whose `dedup_key` (transaction-id,
postback-sequence-index) the table holds under another skan_id is a
`duplicate`. Only verified postbacks enter the table: a forged or tampered copy
carrying a real transaction-id comes out `invalid_signature` and leaves no
trace, so it can never pre-empt the genuine one. A replay of the first (its own
skan_id) stays `verified`: at-least-once input, the same record out.

An entry lives `[skan] dedup_retention` from the moment its postback was
received, then is deleted on a tick of its partition; a copy arriving after that
counts again. Entry (JSON bytes): {"p": partition, "o": skan_id of the first,
"exp": ms when it may go}.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping

from pipeline.config import Settings
from pipeline.core import skan
from pipeline.worker.state import ExpiryIndex, dumps, loads

log = logging.getLogger(__name__)


class SkanStage:
    def __init__(
        self,
        settings: Settings,
        table: MutableMapping,
        emit: Callable[[bytes, dict], None],
        index=None,
    ):
        self.config = settings.skan
        self.table, self.emit = table, emit
        self.retention_ms = int(self.config.dedup_retention_s * 1000)
        self.index = index or ExpiryIndex()
        if any(len(keys) > 1 for keys in self.config.keys.values()):
            log.warning(
                "[skan] test_keys are set: postbacks signed with them count as verified "
                "(for tests and demos only, never in production)"
            )

    def on_report(self, partition: int, report: dict, key: bytes) -> None:
        """Evaluate one report and emit its skan_postback record under `key`."""
        record = skan.postback_record(report, self.config)
        if record["outcome"] == "verified":
            dedup = skan.dedup_key(record)
            entry = loads(self.table.get(dedup))
            if entry is None:
                entry = {
                    "p": partition,
                    "o": record["skan_id"],
                    "exp": record["received_at_ms"] + self.retention_ms,
                }
                self.table[dedup] = dumps(entry)
                self.index.push(partition, entry["exp"], dedup)
            elif entry["o"] != record["skan_id"]:
                record = skan.duplicate(record, entry["o"])
        self.emit(key, record)

    def on_tick(self, partition: int, now_ms: int) -> None:
        """Delete the entries of `partition` whose retention is over."""
        built = self.index.ensure(partition, self.table, lambda e: e["exp"])
        recount = getattr(self.table, "recount", None)
        if built and recount is not None:
            recount(built)
        for key in list(self.index.due(partition, now_ms)):
            entry = loads(self.table.get(key))
            if entry is not None and entry["exp"] <= now_ms:
                del self.table[key]

    def prepare(self, partitions) -> None:
        """Partitions were assigned and restored: index them before their records come."""
        partitions = sorted(partitions)
        if partitions:
            built = self.index.ensure(partitions[0], self.table, lambda e: e["exp"], partitions)
            recount = getattr(self.table, "recount", None)
            if built and recount is not None:
                recount(built)

    def forget(self, partitions) -> None:
        """Partitions were revoked: their index is rebuilt if they come back."""
        self.index.forget(partitions)
