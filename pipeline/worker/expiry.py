"""The expiry index on disk, for workers whose tables are on disk (`rocksdb://`).

`state.ExpiryIndex` keeps a heap item (deadline, key) per live key in Python,
about 150 bytes each: with a RocksDB table that heap would be most of the
worker's memory. `DiskExpiryIndex` has the same interface and keeps the items in
a RocksDB of its own, keyed so that RocksDB's order is the deadline order:

    partition (2 bytes) + deadline in ms (8 bytes, big-endian) + table key

It is not changelogged: like the heap it is rebuilt from the table after every
assignment (a fresh, empty database at start-up), so it never outlives the state
it indexes. Lazy deletion as in the heap: a popped key is checked against the
table, a key written again gets a second item.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path

import rocksdict

from pipeline.worker.state import loads

_PREFIX = struct.Struct(">HQ")
# RocksDB's memory for the index: small write buffers and block cache (the index
# is read in order, once per tick, from its oldest items)
WRITE_BUFFER_BYTES = 2 << 20
BLOCK_CACHE_BYTES = 1 << 20
BATCH_ITEMS = 1000


class DiskExpiryIndex:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        shutil.rmtree(self.path, ignore_errors=True)  # rebuilt from the tables anyway
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(WRITE_BUFFER_BYTES)
        options.set_max_write_buffer_number(2)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(rocksdict.Cache(BLOCK_CACHE_BYTES))
        options.set_block_based_table_factory(table)
        self.db = rocksdict.Rdict(str(self.path), options)
        self.built: set[int] = set()
        # items pushed since the last write: one WriteBatch is 4x cheaper than a put
        # each, and the index is read only on ticks (every read writes them first)
        self._batch = rocksdict.WriteBatch(raw_mode=True)

    def push(self, partition: int, deadline: int, key: bytes) -> None:
        if partition in self.built:  # not built yet: the rebuild will find this key
            self._batch.put(_PREFIX.pack(partition, max(deadline, 0)) + key, b"")
            if self._batch.len() >= BATCH_ITEMS:
                self._write()

    def _write(self) -> None:
        if not self._batch.is_empty():
            self.db.write(self._batch)
            self._batch = rocksdict.WriteBatch(raw_mode=True)

    def ensure(
        self, partition: int, table: MutableMapping, deadline_of, also: Iterable[int] = ()
    ) -> dict[int, int]:
        """Build the index of `partition`, of `also` and of every other partition not
        built yet from one scan of the table; returns the number of keys of each one."""
        if partition in self.built:
            return {}
        self._write()
        found = {p: 0 for p in {partition, *also} if p not in self.built}
        for key, raw in table.items():
            entry = loads(raw)
            if entry["p"] not in self.built:
                found[entry["p"]] = found.get(entry["p"], 0) + 1
                self.db.put(_PREFIX.pack(entry["p"], max(deadline_of(entry), 0)) + key, b"")
        self.built |= set(found)
        return found

    def due(self, partition: int, now_ms: int) -> Iterator[bytes]:
        """Pop and yield the keys whose deadline has passed."""
        if partition not in self.built:
            return
        self._write()
        start = _PREFIX.pack(partition, 0)
        end = _PREFIX.pack(partition, max(now_ms + 1, 0))
        popped = []
        it = self.db.iter()
        it.seek(start)
        while it.valid():
            item = it.key()
            if item >= end:
                break
            popped.append(item)
            it.next()
        del it
        for item in popped:
            self.db.delete(item)
            yield item[_PREFIX.size :]

    def forget(self, partitions: Iterable[int]) -> None:
        self._write()
        for partition in partitions:
            if partition in self.built:
                self.built.discard(partition)
                self.db.delete_range(_PREFIX.pack(partition, 0), _PREFIX.pack(partition + 1, 0))

    def size(self) -> int:
        """Items in the index, stale ones included (a scan: for tests and tools)."""
        self._write()
        return sum(1 for _ in self.db.keys())

    def close(self) -> None:
        self._write()
        self.db.close()
