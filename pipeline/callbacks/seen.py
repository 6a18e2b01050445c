"""The callbacks this process has already taken from its input topics. Pure bookkeeping.

The worker is at-least-once: killed, it emits again the conversions (and
SKAdNetwork postbacks) it had emitted since its last commit, with the same IDs,
seconds after the first ones. Each would be a second callback. The service keeps
the key of the last `size` records it took, with where it read it (topic,
partition, offset), and skips a repeat read elsewhere: a callback already
delivered, retrying or dead is not started again. The same record read again at
the same place is no repeat: its work was dropped (a rebalance, a stop) before
its offset was committed, and it is redone. Bounded (oldest forgotten first); a
restart of this service forgets all of it, and then its committed offsets are
what keep a repeat out.
"""

from __future__ import annotations

from collections.abc import Hashable

SIZE = 200_000  # keys kept: some 40 MB at most; a worker's replay is far fewer


class Seen:
    def __init__(self, size: int = SIZE):
        self.size = size
        self._where: dict[Hashable, tuple] = {}  # insertion-ordered: the oldest first

    def first(self, key: Hashable, where: tuple) -> bool:
        """False when `key` was taken before from another place than `where` (a
        repeat); else True, and `key` is remembered as read at `where`."""
        known = self._where.get(key)
        if known is not None:
            return known == where
        self._where[key] = where
        if len(self._where) > self.size:
            del self._where[next(iter(self._where))]
        return True

    def __len__(self) -> int:
        return len(self._where)
