"""Faust's table recovery with its resume order fixed and its highwaters true."""

from __future__ import annotations

import asyncio

import faust
import faust.tables.recovery
from aiokafka import TopicPartition

from pipeline import kafka


class Recovery(faust.tables.recovery.Recovery):
    """Faust's table recovery, resuming the stream partitions only once it is safe.

    Faust's `Recovery.on_recovery_completed` resumes the stream partitions first and
    only then awaits `perform_seek` and calls `app.flow_control.resume()`. The consumer
    flow is already running (it was resumed to read the changelogs), so records that
    aiokafka prefetched for those partitions during the recovery reach the streams'
    queues while `perform_seek` is awaited, and `flow_control.resume()` then empties
    those queues (they are `clear_on_resume`): dropped, never processed, never acked,
    while aiokafka's position has moved past them. Nothing seeks back (a partition
    without a committed offset is not seeked at all), later records are committed past
    them: a partition taken over after a rebalance silently loses its backlog, often
    all of it on Apache Kafka, which fills the prefetch buffers during the recovery.

    Same steps here, in a safe order: seek, clear the queues, then resume the stream
    partitions and the flow.
    """

    async def _build_highwaters(self, consumer, tps, destination, title: str) -> None:
        """Faust's highwaters (the last offset to restore) from `kafka.log_end_offsets`:
        Faust asks ListOffsets, which on Tansu stops short of the last record batch."""
        bootstrap = ",".join(f"{url.host}:{url.port}" for url in self.app.conf.broker_consumer)
        ends = await kafka.log_end_offsets(
            bootstrap, [TopicPartition(tp.topic, tp.partition) for tp in tps]
        )
        highwaters = {tp: ends[TopicPartition(tp.topic, tp.partition)] - 1 for tp in tps}
        self.log.info(
            "Highwater for %s changelog partitions:\n%s",
            title,
            self._highwater_logtable(highwaters, title=title),
        )
        destination.clear()
        destination.update(highwaters)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        app, consumer = self.app, self.app.consumer
        self.log.info("Restore complete!")
        await app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        if app.consumer_generation_id != generation_id:
            self.log.warning(
                "Recovery rebalancing again app id %r param %r",
                app.consumer_generation_id,
                generation_id,
            )
            return
        assignment = consumer.assignment()
        if assignment:
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        self.completed.set()
        app.flow_control.resume()  # clears Faust's stream queues: nothing of this generation yet
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        consumer.resume_flow()
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class TableManager(faust.tables.TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
