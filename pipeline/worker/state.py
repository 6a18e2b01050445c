"""Worker state entries and their expiry, independent of Faust.

A state entry is JSON bytes (compact, and readable in the changelog topic):

    {"p": partition, "exp": ms when the entry may go, "c": click fields or absent,
     "i": conversion_id that counted the install, "q": [pending postbacks]}

Faust's windowed tables may not expire keys restored from a changelog
(faust-streaming#385), so expiry is ours: `ExpiryIndex` keeps a heap of
deadlines per partition, rebuilt from the table after every assignment, and
the handlers delete due keys while handling a tick of that very partition (so
the tombstone lands in the right changelog partition).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, MutableMapping
from decimal import Decimal

import orjson


def dumps(entry: dict) -> bytes:
    # compact, a Decimal as its string; copied because orjson's bytes keep the
    # capacity of its 4 KiB output buffer, ten times an entry, for as long as they live
    return memoryview(orjson.dumps(entry, default=str)).tobytes()


def loads(raw: bytes | None) -> dict | None:
    return None if raw is None else orjson.loads(raw)


def postback_to_json(postback: dict) -> dict:
    return {
        **postback,
        "revenue": None if postback["revenue"] is None else str(postback["revenue"]),
    }


def postback_from_json(data: dict) -> dict:
    revenue = data["revenue"]
    return {**data, "revenue": None if revenue is None else Decimal(revenue)}


def next_deadline(entry: dict, grace_ms: int) -> int:
    """The earliest time this entry needs attention: a pending postback's grace, or expiry."""
    pending = [p["received_at_ms"] + grace_ms for p in entry.get("q", ())]
    return min([entry["exp"], *pending])


def recount(table: MutableMapping, built: dict[int, int]) -> None:
    """Tell a table that counts its keys (worker.outputs.Changelogged) what a scan found."""
    counted = getattr(table, "recount", None)
    if built and counted is not None:
        counted(built)


class ExpiryIndex:
    """Per-partition heaps of (deadline_ms, key), rebuilt lazily from the table.

    Entries are never removed from a heap eagerly: a popped key is checked
    against the table's current value (lazy deletion), so the index stays cheap.
    """

    def __init__(self):
        self.heaps: dict[int, list[tuple[int, bytes]]] = {}

    def push(self, partition: int, deadline: int, key: bytes) -> None:
        heap = self.heaps.get(partition)
        if heap is not None:  # not built yet: the rebuild will find this key
            heapq.heappush(heap, (deadline, key))

    def ensure(
        self, partition: int, table: MutableMapping, deadline_of, also: Iterable[int] = ()
    ) -> dict[int, int]:
        """Build the heap of `partition` from the table if it is not built yet, and
        those of every other partition found in the same scan (one scan, not one per
        partition: the table holds only the partitions this worker owns). Returns
        the number of keys of each partition built (nothing if none was). `also`:
        more partitions to build in the same scan, found in the table or not."""
        if partition in self.heaps:
            return {}
        heaps: dict[int, list[tuple[int, bytes]]] = {
            p: [] for p in {partition, *also} if p not in self.heaps
        }
        for key, raw in table.items():
            entry = loads(raw)
            if entry["p"] not in self.heaps:
                heaps.setdefault(entry["p"], []).append((deadline_of(entry), key))
        for built, heap in heaps.items():
            heapq.heapify(heap)
            self.heaps[built] = heap
        return {built: len(heap) for built, heap in heaps.items()}

    def due(self, partition: int, now_ms: int) -> Iterable[bytes]:
        """Pop and yield the keys whose deadline has passed (each at most once per pop)."""
        heap = self.heaps.get(partition, [])
        while heap and heap[0][0] <= now_ms:
            yield heapq.heappop(heap)[1]

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.heaps.pop(partition, None)

    def size(self) -> int:
        return sum(len(h) for h in self.heaps.values())
