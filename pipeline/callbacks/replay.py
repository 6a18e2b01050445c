"""`pipeline callbacks-replay`: send dead-lettered callbacks round again.

Reads `callbacks-dead` from where the last replay stopped (consumer group
`callbacks-replay`, committed per batch after the tasks are acknowledged) up to
the end it saw at start, and puts each letter back in `callbacks-retry-1`, due
at once, with a fresh retry schedule; attempt numbers go on. The running
`pipeline callbacks` service picks them up within the first retry delay. A
crash mid-replay replays a batch twice at worst; the Idempotency-Key makes that
harmless to publishers.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition

from pipeline import codec, kafka
from pipeline.config import Settings
from pipeline.core import callback as request
from pipeline.core import delivery as policy


async def replay_dead(settings: Settings, topics, group: str) -> int:
    """Re-enqueue the dead letters not replayed before; returns how many. `topics`:
    the service's (`app.Topics`); `group`: the replay's own consumer group."""
    s = settings
    await kafka.ensure_topics(s, [topics.dead, topics.retry(1)])
    producer = kafka.producer(s)
    consumer = kafka.consumer(s, s.topic(group), [])
    await producer.start()
    await consumer.start()
    count = 0
    try:
        partitions = [TopicPartition(s.topic(topics.dead), p) for p in range(s.kafka_partitions)]
        # assigned, not subscribed: no group rebalance to wait for, offsets still commit
        consumer.assign(partitions)
        ends = await kafka.log_end_offsets(s.kafka_bootstrap, partitions)
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                batch = (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
                if not batch:
                    continue
                now = int(time.time() * 1000)
                sent = []
                for message in batch:
                    task = policy.replayed(codec.CALLBACK_TASK.decode(message.value), now)
                    sent.append(
                        await producer.send(
                            s.topic(topics.retry(1)),
                            codec.CALLBACK_TASK.encode(task),
                            key=request.callback_id(task).encode(),
                        )
                    )
                await asyncio.gather(*sent)
                await consumer.commit({tp: batch[-1].offset + 1})
                count += len(batch)
    finally:
        await consumer.stop()
        await producer.stop()
    return count
