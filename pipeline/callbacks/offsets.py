"""Which offset of a partition may be committed while messages finish out of order. Pure.

Callbacks of one partition run concurrently (different publishers, different
speeds), so message 7 may finish before message 5. Committing 8 then would
lose 5 in a crash. A `Tracker` commits only below the lowest unfinished
offset: everything before the committed offset is finished for good.
"""

from __future__ import annotations

import heapq


class Tracker:
    """Offsets of one partition, for one assignment of it (a new assignment starts a
    new tracker, so a late finish from before a rebalance cannot move it)."""

    def __init__(self) -> None:
        self._next: int | None = None  # one past the last offset seen
        self._open: set[int] = set()
        self._heap: list[int] = []  # lazily cleaned min-heap over _open
        self.committed: int | None = None

    def start(self, offset: int) -> None:
        """`offset` is in progress: no commit may pass it until `finish(offset)`."""
        self._open.add(offset)
        heapq.heappush(self._heap, offset)
        self._seen(offset)

    def finish(self, offset: int) -> None:
        self._open.discard(offset)

    def skip(self, offset: int) -> None:
        """`offset` needed no work (not a callback, or finished on the spot)."""
        self._seen(offset)

    def rewind(self, offset: int) -> None:
        """The consumer will read `offset` again (it waits for its due time)."""
        self._next = offset

    def _seen(self, offset: int) -> None:
        if self._next is None or offset >= self._next:
            self._next = offset + 1

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def commit_offset(self) -> int | None:
        """The offset to commit (the next message to read after a restart), or None
        when nothing new is finished since the last `committed`."""
        while self._heap and self._heap[0] not in self._open:
            heapq.heappop(self._heap)
        position = self._heap[0] if self._heap else self._next
        if position is None or (self.committed is not None and position <= self.committed):
            return None
        return position
