"""The join of postbacks to clicks, as handlers over plain mappings.

The batch handlers (pipeline/worker/app.py) call these methods with the
partition of the event and its decoded value; the handlers read and write the
state mapping (a Faust table in production, a dict in tests) and hand results
to `emit` (a final conversion) or `check_txn` (an attributed conversion whose
txn_id must be checked across all clicks). They never await, so no two events
interleave between reading and writing a key.

Stage 1, keyed by click_id: clicks, postbacks and ticks of the same partition.
Stage 2, keyed by advertiser + txn_id: txn_id dedup across clicks.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from pipeline.config import Settings
from pipeline.core import attribution
from pipeline.worker.state import (
    ExpiryIndex,
    dumps,
    loads,
    next_deadline,
    postback_from_json,
    postback_to_json,
)

# the first wait before a pending postback is checked again while its clicks are behind
RECHECK_MS = 1000


class Joiner:
    def __init__(
        self,
        settings: Settings,
        state: MutableMapping,
        txns: MutableMapping,
        emit: Callable[[dict], None],
        check_txn: Callable[[dict], None],
        margin_s: float = 3600,
        indexes: tuple | None = None,
    ):
        self.settings = settings
        self.state, self.txns = state, txns
        self.emit, self.check_txn = emit, check_txn
        self.retention_ms = int(attribution.state_retention_s(settings, margin_s) * 1000)
        self.grace_ms = int(settings.unknown_click_grace * 1000)
        # (state, txns) expiry indexes: in memory by default, on disk with a disk store
        self.state_index, self.txn_index = indexes or (ExpiryIndex(), ExpiryIndex())
        # partition -> how long a pending postback waits before its next check while
        # the clicks are behind: doubles per check, up to the grace, so a backlog of
        # pending postbacks costs a few passes, not one every second
        self.recheck_ms: dict[int, int] = {}

    # --- stage 1 -------------------------------------------------------------

    def on_click(self, partition: int, click: dict) -> None:
        key = click["click_id"].encode()
        entry = loads(self.state.get(key)) or {"p": partition, "q": []}
        if "c" in entry:
            return  # a replayed click: already known
        entry["c"] = {f: click[f] for f in attribution.CLICK_FIELDS}
        entry["exp"] = click["ts_ms"] + self.retention_ms
        pending, entry["q"] = entry.get("q", []), []
        for postback in pending:
            self._resolve(entry, postback_from_json(postback))
        self._store(key, entry)

    def on_postback(self, partition: int, postback: dict) -> None:
        if postback["outcome"] != "accepted":
            return  # logged by the sink; nothing to attribute
        key = postback["click_id"].encode()
        entry = loads(self.state.get(key))
        if entry is not None and "c" in entry:
            before = entry.get("i")
            self._resolve(entry, postback)
            if entry.get("i") != before:
                self._store(key, entry)
            return
        # a postback queued now must get its answer before its entry expires
        old = attribution.too_old(
            self.settings, postback, (self.retention_ms - self.grace_ms) / 1000
        )
        if old is not None:
            self.emit(old)
            return
        entry = entry or {
            "p": partition,
            "q": [],
            "exp": postback["click_ts_ms"] + self.retention_ms,
        }
        if all(p["postback_id"] != postback["postback_id"] for p in entry["q"]):
            entry["q"].append(postback_to_json(postback))
        self._store(key, entry)

    def on_tick(self, partition: int, now_ms: int, clicks_caught_up: bool) -> None:
        """Expire due state of `partition`; give up on pending postbacks only when the
        clicks partition is caught up (a click still in the backlog is not missing)."""
        built = self.state_index.ensure(
            partition, self.state, lambda e: next_deadline(e, self.grace_ms)
        )
        _recount(self.state, built)
        if clicks_caught_up:
            self.recheck_ms.pop(partition, None)
            recheck = RECHECK_MS
        else:
            recheck = self.recheck_ms.get(partition, RECHECK_MS // 2) * 2
            self.recheck_ms[partition] = min(recheck, max(self.grace_ms, RECHECK_MS))
        for key in list(self.state_index.due(partition, now_ms)):
            entry = loads(self.state.get(key))
            if entry is None:
                continue
            if entry["q"] and not clicks_caught_up:
                self.state_index.push(partition, now_ms + recheck, key)
                continue
            keep = []
            for postback in entry["q"]:
                if postback["received_at_ms"] + self.grace_ms <= now_ms:
                    self.emit(
                        attribution.unknown_click(self.settings, postback_from_json(postback))
                    )
                else:
                    keep.append(postback)
            if entry["exp"] <= now_ms or ("c" not in entry and not keep):
                del self.state[key]
            elif len(keep) != len(entry["q"]):
                entry["q"] = keep
                self._store(key, entry)
            else:  # a stale heap item: nothing changed, only the next deadline matters
                self.state_index.push(partition, next_deadline(entry, self.grace_ms), key)

    def _resolve(self, entry: dict, postback: dict) -> None:
        row = attribution.decide(self.settings, entry["c"], postback, entry.get("i"))
        if row["status"] == "attributed" and row["event"] == "install":
            entry["i"] = row["conversion_id"]
        if row["status"] == "attributed" and row["txn_id"]:
            self.check_txn(row)
        else:
            self.emit(row)

    def _store(self, key: bytes, entry: dict) -> None:
        self.state[key] = dumps(entry)
        self.state_index.push(entry["p"], next_deadline(entry, self.grace_ms), key)

    # --- stage 2 -------------------------------------------------------------

    def on_txn(self, partition: int, row: dict) -> None:
        """First conversion per advertiser and txn_id is attributed; later ones duplicate."""
        key = txn_key(row)
        entry = loads(self.txns.get(key))
        if entry is not None and entry["o"] != row["conversion_id"]:
            self.emit(attribution.txn_duplicate(row, entry["o"]))
            return
        if entry is None:
            entry = {
                "p": partition,
                "o": row["conversion_id"],
                "exp": row["conversion_ts_ms"] + self.retention_ms,
            }
            self.txns[key] = dumps(entry)
            self.txn_index.push(partition, entry["exp"], key)
        self.emit(row)  # first time, or a replay of the owner: same conversion_id

    def on_txn_tick(self, partition: int, now_ms: int) -> None:
        _recount(self.txns, self.txn_index.ensure(partition, self.txns, lambda e: e["exp"]))
        for key in list(self.txn_index.due(partition, now_ms)):
            entry = loads(self.txns.get(key))
            if entry is not None and entry["exp"] <= now_ms:
                del self.txns[key]

    def prepare(self, partitions) -> None:
        """Partitions were assigned and their tables restored: index them now, before
        their records are handled (a tick would otherwise scan a table that has grown)."""
        partitions = sorted(partitions)
        if not partitions:
            return
        first, rest = partitions[0], partitions[1:]
        deadline = lambda e: next_deadline(e, self.grace_ms)  # noqa: E731
        _recount(self.state, self.state_index.ensure(first, self.state, deadline, rest))
        _recount(self.txns, self.txn_index.ensure(first, self.txns, lambda e: e["exp"], rest))

    def forget(self, partitions) -> None:
        """Partitions were revoked: their indexes are rebuilt if they come back."""
        self.state_index.forget(partitions)
        self.txn_index.forget(partitions)
        for partition in partitions:
            self.recheck_ms.pop(partition, None)


def _recount(table: MutableMapping, built: dict[int, int]) -> None:
    """Tell a table that counts its keys (worker.outputs.Changelogged) what a scan found."""
    recount = getattr(table, "recount", None)
    if built and recount is not None:
        recount(built)


def txn_key(row: dict) -> bytes:
    return f"{row['advertiser']}\x00{row['txn_id']}".encode()
