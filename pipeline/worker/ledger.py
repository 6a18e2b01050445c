"""The ledger stage: reversals applied to conversions, keyed by conversion_id.

Stage 3 of the worker (pipeline/worker/app.py). Every final conversion the worker
emits comes here (`on_conversion`: an attributed one with its amounts, any other
as a marker), and so does every accepted reversal (`on_reversal`: named by its
conversion_id, or resolved from its txn_id by stage 2). The accounting is
`core.ledger`; this module keeps what it needs per conversion, over a plain
mapping (a Faust table in production, a dict in tests), and never awaits.

An entry (JSON, `state.dumps`):

    {"p": partition, "exp": ms when it may go, "c": the conversion (core.ledger.kept),
     "t": [amounts taken back so far], "x": the adjustment that reversed it,
     "a": {reversal postback_id: its adjustment row}, "q": [reversals waiting]}

Idempotency: a reversal is answered once; its adjustment row is kept in "a" and
a replay (same postback_id) sends that same row again and changes nothing. A
reversal for a conversion not here yet waits `unknown_click_grace` from its
arrival (or its partition's assignment), then is `unknown_conversion` (kept in
"a" as well). The conversion's
row with status `reversed` is sent again whenever the conversion or its
reversal is replayed, so it stays the latest row of its conversion. Entries
expire with the state's retention after the conversion (or the reversal), with
an expiry index per partition like the other stages. Waiting: worker/waiting.py.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from pipeline.config import Settings
from pipeline.core import attribution, ledger
from pipeline.core.ledger import book_of, store_book, thaw
from pipeline.worker.state import ExpiryIndex, dumps, loads, recount
from pipeline.worker.waiting import Wait, enqueue, resumed, tick


class Ledger:
    def __init__(
        self,
        settings: Settings,
        table: MutableMapping,
        adjust: Callable[[dict], None],
        replace: Callable[[dict], None],
        margin_s: float = 3600,
        index=None,
    ):
        """`adjust`: an adjustment row out (topic adjustments); `replace`: a conversion's
        row out again (topic conversions), status `reversed`."""
        self.settings, self.table = settings, table
        self.adjust, self.replace = adjust, replace
        self.retention_ms = int(attribution.state_retention_s(settings, margin_s) * 1000)
        self.wait = Wait(int(settings.unknown_click_grace * 1000))
        self.index = index or ExpiryIndex()

    def on_conversion(self, partition: int, record: dict) -> None:
        """A final conversion: kept; the reversals that waited for it are answered."""
        key = record["conversion_id"].encode()
        entry = loads(self.table.get(key))
        new = ledger.kept(record)
        if entry is not None and "c" in entry:
            old = entry["c"]
            if old["status"] == "attributed" or new["status"] != "attributed":
                if entry.get("x") is not None:  # a replay: its reversed row goes after it
                    self.replace(ledger.reversed_row(thaw(old), entry["x"]))
                return  # the amounts a conversion was attributed with never change
        entry = entry or {"p": partition, "exp": 0}
        entry["c"] = new
        entry["exp"] = max(entry["exp"], record["ts_ms"] + self.retention_ms)
        for pending in entry.pop("q", ()):
            self._apply(entry, resumed(pending))
        self._store(key, entry)

    def on_reversal(self, partition: int, reversal: dict, now_ms: int) -> None:
        """A reversal naming this conversion: applied once, or waiting for it."""
        key = reversal["conversion_id"].encode()
        entry = loads(self.table.get(key))
        if entry is not None:
            done = entry.get("a", {}).get(reversal["postback_id"])
            if done is not None:
                self._repeat(entry, thaw(done))
                return
            if "c" in entry:
                self._apply(entry, reversal)
                self._store(key, entry)
                return
        else:
            entry = {"p": partition, "exp": now_ms + self.retention_ms}
        if enqueue(entry, reversal, now_ms):
            self._store(key, entry)

    def on_tick(self, partition: int, now_ms: int, caught_up: bool = True) -> None:
        """Answer reversals that waited out their time; expire due entries. `caught_up`:
        whether the ledger partition has no backlog (see worker/waiting.py)."""
        recount(self.table, self.index.ensure(partition, self.table, self.wait.deadline))
        tick(
            self.table,
            self.index,
            self.wait,
            partition,
            now_ms,
            caught_up,
            self._unknown,
            self._store,
        )

    def _unknown(self, entry: dict, reversal: dict) -> None:
        row = ledger.unknown(
            reversal,
            f"no conversion {reversal['conversion_id']} of advertiser "
            f"{reversal['advertiser']} within {self.settings.unknown_click_grace:g}s",
        )
        entry.setdefault("a", {})[reversal["postback_id"]] = row
        self.adjust(row)

    def _apply(self, entry: dict, reversal: dict) -> None:
        conversion = thaw(entry["c"])
        decision = ledger.decide(self.settings, conversion, book_of(entry), reversal)
        store_book(entry, decision.book)
        entry.setdefault("a", {})[reversal["postback_id"]] = decision.adjustment
        self.adjust(decision.adjustment)
        if decision.reverses:
            self.replace(ledger.reversed_row(conversion, reversal["postback_id"]))

    def _repeat(self, entry: dict, row: dict) -> None:
        """A replayed reversal: its adjustment (and reversed row) again, nothing applied."""
        self.adjust(row)
        if entry.get("x") == row["adjustment_id"]:
            self.replace(ledger.reversed_row(thaw(entry["c"]), row["adjustment_id"]))

    def _store(self, key: bytes, entry: dict) -> None:
        if not entry.get("q"):
            entry.pop("q", None)
        self.table[key] = dumps(entry)
        self.index.push(entry["p"], self.wait.deadline(entry), key)

    def prepare(self, partitions, now_ms: int = 0) -> None:
        """Partitions were assigned (at `now_ms`) and the table restored: index them now."""
        partitions = sorted(partitions)
        self.wait.ready(partitions, now_ms)
        if partitions:
            built = self.index.ensure(partitions[0], self.table, self.wait.deadline, partitions[1:])
            recount(self.table, built)

    def forget(self, partitions) -> None:
        """Partitions were revoked: their index is rebuilt if they come back."""
        self.index.forget(partitions)
        self.wait.forget(partitions)
