"""The conversions this process has already taken a callback for. Pure bookkeeping.

The worker is at-least-once: killed, it emits again the conversions it had
emitted since its last commit, with the same conversion_id, seconds after the
first ones. Each would be a second callback to the publisher. The service keeps
the IDs of the last `size` conversions it took from the conversions topic and
skips a repeat: a callback already delivered, retrying or dead is not started
again. Bounded (oldest forgotten first); a restart of this service forgets all
of it, and then its committed offsets are what keep a repeat out.
"""

from __future__ import annotations

SIZE = 200_000  # conversion IDs kept: some 20 MB; a worker's replay is far fewer


class Seen:
    def __init__(self, size: int = SIZE):
        self.size = size
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest first

    def first(self, conversion_id: str) -> bool:
        """True the first time `conversion_id` is seen (and remember it), else False."""
        if conversion_id in self._ids:
            return False
        self._ids[conversion_id] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]
        return True

    def __len__(self) -> int:
        return len(self._ids)
