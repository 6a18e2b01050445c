"""The join of postbacks to clicks, as handlers over plain mappings.

The batch handlers (pipeline/worker/app.py) call these methods with the
partition of the event and its decoded value; the handlers read and write the
state mapping (a Faust table in production, a dict in tests) and hand results
to `emit` (a final conversion) or `check_txn` (an attributed conversion whose
txn_id must be checked across all clicks). They never await, so no two events
interleave between reading and writing a key.

Stage 1, keyed by click_id: clicks, postbacks and ticks of the same partition.
Stage 2, keyed by advertiser + txn_id: txn_id dedup across clicks; it also
resolves reversals named by txn_id to the conversion that owns the txn_id.

Reversals pass through: stage 1 sends one naming a conversion_id to the ledger
stage (`to_ledger`, worker/ledger.py) and one naming a txn_id to stage 2
(`check_reversal`). Stage 2 forwards it to the ledger with the owner's
conversion_id (or that of a conversion with the txn_id that was not attributed,
which `emit` reports to stage 2 as a marker); with none yet it waits
(worker/waiting.py), then is answered `unknown_conversion` (`adjust`), and a
replay of it gets the same answer for as long as the entry lives.

A txns entry: {"p": partition, "exp": ms, "o": owner conversion_id, "n": a
non-attributed conversion_id, "q": [waiting reversals], "d": [reversal IDs
answered unknown_conversion]}, each key but p and exp only when it has a value.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from pipeline.config import Settings
from pipeline.core import attribution, ledger
from pipeline.worker.state import (
    ExpiryIndex,
    dumps,
    loads,
    next_deadline,
    postback_from_json,
    postback_to_json,
    recount,
)
from pipeline.worker.waiting import Wait, enqueue, resumed, tick

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
        *,
        to_ledger: Callable[[dict], None] | None = None,
        check_reversal: Callable[[dict], None] | None = None,
        adjust: Callable[[dict], None] | None = None,
    ):
        self.settings = settings
        self.state, self.txns = state, txns
        self.emit, self.check_txn = emit, check_txn
        # reversals: to the ledger stage, to stage 2 (by txn_id), an adjustment row
        self.to_ledger, self.check_reversal, self.adjust = to_ledger, check_reversal, adjust
        self.retention_ms = int(attribution.state_retention_s(settings, margin_s) * 1000)
        self.grace_ms = int(settings.unknown_click_grace * 1000)
        self.txn_wait = Wait(self.grace_ms)  # reversals waiting for a txn_id's conversion
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
        if postback.get("status"):
            self._route_reversal(postback)
            return
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
        recount(self.state, built)
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

    def _route_reversal(self, postback: dict) -> None:
        record = ledger.reversal_entry(postback, postback["conversion_id"] or "")
        if record["conversion_id"]:
            self.to_ledger(record)
        else:
            self.check_reversal(record)

    # --- stage 2 -------------------------------------------------------------

    def on_txn(self, partition: int, row: dict) -> None:
        """First conversion per advertiser and txn_id is attributed; later ones duplicate.
        One that is not attributed (a marker from `emit`) is only noted, so that a
        reversal by its txn_id can be told `not_attributed`."""
        key = txn_key(row)
        entry = loads(self.txns.get(key))
        owner = None if entry is None else entry.get("o")
        cid = row["conversion_id"]
        if row["status"] != "attributed":
            if owner is None and (entry is None or entry.get("n") != cid):
                entry = entry or self._txn_entry(partition, row["conversion_ts_ms"])
                entry["n"] = cid
                self._release(entry, cid)
                self._store_txn(key, entry)
            return
        if owner is not None and owner != cid:
            self.emit(attribution.txn_duplicate(row, owner))
            return
        if owner is None:
            entry = entry or self._txn_entry(partition, row["conversion_ts_ms"])
            entry["o"] = cid
            entry["exp"] = max(entry["exp"], row["conversion_ts_ms"] + self.retention_ms)
            self.emit(row)  # before the reversals it releases: the ledger hears of it first
            self._release(entry, cid)
            self._store_txn(key, entry)
            return
        self.emit(row)  # a replay of the owner: same conversion_id

    def on_txn_reversal(self, partition: int, reversal: dict, now_ms: int) -> None:
        """A reversal by txn_id: to the ledger as the conversion that has the txn_id, or
        wait for one (see the module docstring)."""
        key = txn_key(reversal)
        entry = loads(self.txns.get(key))
        rid = reversal["postback_id"]
        if entry is not None:
            if rid in entry.get("d", ()):
                self._unknown_txn(None, reversal)  # answered before: the same answer
                return
            target = entry.get("o") or entry.get("n")
            if target:
                self.to_ledger({**reversal, "conversion_id": target})
                return
        else:
            entry = {"p": partition, "exp": now_ms + self.retention_ms}
        if enqueue(entry, reversal, now_ms):
            self._store_txn(key, entry)

    def on_txn_tick(self, partition: int, now_ms: int, caught_up: bool = True) -> None:
        """Expire due txns entries; answer reversals that waited out their time while
        txn-check is caught up (`caught_up`)."""
        deadline = self.txn_wait.deadline
        recount(self.txns, self.txn_index.ensure(partition, self.txns, deadline))
        tick(
            self.txns,
            self.txn_index,
            self.txn_wait,
            partition,
            now_ms,
            caught_up,
            self._unknown_txn,
            self._store_txn,
        )

    def _txn_entry(self, partition: int, ts_ms: int) -> dict:
        return {"p": partition, "exp": ts_ms + self.retention_ms}

    def _store_txn(self, key: bytes, entry: dict) -> None:
        if not entry.get("q"):
            entry.pop("q", None)
        self.txns[key] = dumps(entry)
        self.txn_index.push(entry["p"], self.txn_wait.deadline(entry), key)

    def _release(self, entry: dict, conversion_id: str) -> None:
        """Reversals that waited for this txn_id: to the ledger, as `conversion_id`'s."""
        for pending in entry.pop("q", ()):
            self.to_ledger({**resumed(pending), "conversion_id": conversion_id})

    def _unknown_txn(self, entry: dict | None, reversal: dict) -> None:
        """`unknown_conversion`; recorded in the entry so that a replay gets it again."""
        if entry is not None:
            entry.setdefault("d", []).append(reversal["postback_id"])
        self.adjust(
            ledger.unknown(
                reversal,
                f"no conversion with txn_id {reversal['txn_id']} of advertiser "
                f"{reversal['advertiser']} within {self.settings.unknown_click_grace:g}s",
            )
        )

    def prepare(self, partitions, now_ms: int = 0) -> None:
        """Partitions were assigned (at `now_ms`) and their tables restored: index them
        now, before their records are handled (a tick would otherwise scan a table that
        has grown)."""
        partitions = sorted(partitions)
        self.txn_wait.ready(partitions, now_ms)
        if not partitions:
            return
        first, rest = partitions[0], partitions[1:]
        deadline = lambda e: next_deadline(e, self.grace_ms)  # noqa: E731
        recount(self.state, self.state_index.ensure(first, self.state, deadline, rest))
        recount(self.txns, self.txn_index.ensure(first, self.txns, self.txn_wait.deadline, rest))

    def forget(self, partitions) -> None:
        """Partitions were revoked: their indexes are rebuilt if they come back."""
        self.state_index.forget(partitions)
        self.txn_index.forget(partitions)
        self.txn_wait.forget(partitions)
        for partition in partitions:
            self.recheck_ms.pop(partition, None)


def txn_key(row: dict) -> bytes:
    return f"{row['advertiser']}\x00{row['txn_id']}".encode()


# txn-check's key of a reversal: 0x00 + its txn_key (advertiser IDs never start with
# 0x00, so no conversion's key does), sent to the partition of the txn_key
REVERSAL_MARK = b"\x00"
