"""Reversals waiting for their conversion, in the txn stage and the ledger stage.

A reversal can reach its stage before the conversion it names (the conversion's
postback still waits for its click, or is on its way through the stages). It then
waits in its table entry's "q" list, with the time it arrived ("since_ms"), for
`unknown_click_grace`, counted from its arrival or from when its partition was
last assigned, whichever is later, so a restart's downtime does not count; and it
is given up only while the stage's input partition is caught up (a conversion still
in the backlog is not missing), as stage 1 does for postbacks waiting for clicks.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from pipeline.core import ledger
from pipeline.worker.state import loads

# how long a waiting reversal is put off while its stage's input is behind
RECHECK_MS = 1000


class Wait:
    def __init__(self, grace_ms: int):
        self.grace_ms = grace_ms
        self.ready_ms: dict[int, int] = {}  # partition -> when it was last assigned

    def until(self, partition: int, pending: dict) -> int:
        """When `pending`, a reversal waiting on `partition`, is given up."""
        return max(pending["since_ms"], self.ready_ms.get(partition, 0)) + self.grace_ms

    def deadline(self, entry: dict) -> int:
        """The earliest time an entry needs its tick: a wait's end, or expiry."""
        return min([entry["exp"], *(self.until(entry["p"], p) for p in entry.get("q", ()))])

    def ready(self, partitions, now_ms: int) -> None:
        for partition in partitions:
            self.ready_ms[partition] = now_ms

    def forget(self, partitions) -> None:
        for partition in partitions:
            self.ready_ms.pop(partition, None)


def tick(
    table: MutableMapping,
    index,
    wait: Wait,
    partition: int,
    now_ms: int,
    caught_up: bool,
    give_up: Callable[[dict, dict], None],
    store: Callable[[bytes, dict], None],
) -> None:
    """Expire due entries of `partition`; hand each reversal that waited out its time
    to `give_up(entry, reversal)`, which records its answer in the entry (stored after)."""
    for key in list(index.due(partition, now_ms)):
        entry = loads(table.get(key))
        if entry is None:
            continue
        waiting = entry.get("q", [])
        if waiting and not caught_up:
            index.push(partition, now_ms + RECHECK_MS, key)
            continue
        keep = [p for p in waiting if wait.until(partition, p) > now_ms]
        for pending in waiting:
            if wait.until(partition, pending) <= now_ms:
                give_up(entry, resumed(pending))
        if entry["exp"] <= now_ms:
            del table[key]
        elif len(keep) != len(waiting):
            entry["q"] = keep
            store(key, entry)
        else:  # a stale heap item: nothing changed, only the next deadline matters
            index.push(partition, wait.deadline(entry), key)


def enqueue(entry: dict, reversal: dict, now_ms: int) -> bool:
    """Add `reversal` to the entry's waiting list; False when it waits there already
    (a replay)."""
    waiting = entry.setdefault("q", [])
    if any(p["postback_id"] == reversal["postback_id"] for p in waiting):
        return False
    waiting.append({**reversal, "since_ms": now_ms})
    return True


def resumed(pending: dict) -> dict:
    """A waiting reversal as it was sent: without its arrival time, amounts as Decimals."""
    return ledger.thaw({k: v for k, v in pending.items() if k != "since_ms"})
