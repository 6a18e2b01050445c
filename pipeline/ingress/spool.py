"""A local append-only spool for postback log records Kafka would not take.

When Kafka is down the advertiser gets `503 unavailable`, and the record of
that request must still reach the `postbacks` table. It is appended here (one
base64 Avro record a line, fsync'd) and republished when Kafka is back, then
the file is truncated. Records carry their postback_id, so a replay after a
crash between publish and truncate is deduplicated by the warehouse.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# records republished at once: enough for full produce batches (the ingress's
# publisher makes a lone record wait up to 2 ms for others), few enough to stay small
CHUNK = 256


class Spool:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()

    def append(self, key: bytes, value: bytes) -> None:
        """Durably append one record (blocking, small: only on the failure path)."""
        line = base64.b64encode(key) + b" " + base64.b64encode(value) + b"\n"
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> bool:
        """Anything to republish? A stat, not a read: the ingress asks every few seconds."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    async def drain(self, publish) -> int:
        """Republish every spooled record with `await publish(key, value)`, `CHUNK` at a
        time, in file order; then truncate. If one fails, the file is kept whole, once
        the rest of its chunk has settled (none is left in flight past the lock)."""
        async with self._lock:
            try:
                lines = self.path.read_bytes().splitlines()
            except FileNotFoundError:
                return 0
            for start in range(0, len(lines), CHUNK):
                chunk = [line.split(b" ") for line in lines[start : start + CHUNK]]
                results = await asyncio.gather(
                    *(publish(base64.b64decode(k), base64.b64decode(v)) for k, v in chunk),
                    return_exceptions=True,
                )
                failed = next((r for r in results if isinstance(r, BaseException)), None)
                if failed is not None:
                    raise failed
            self.path.write_bytes(b"")
            if lines:
                log.info("republished %d spooled postback records", len(lines))
            return len(lines)
