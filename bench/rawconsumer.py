"""The worker figure's baseline: a raw aiokafka consumer that reads the clicks
and postbacks topics from the beginning and decodes every message with the
pipeline's Avro codecs, nothing else. Its own process, like the worker.

    python -m bench.rawconsumer --bootstrap H:P --prefix P. --count N

Prints one JSON line: messages, seconds and per_s of the best of --passes
reads (each timed from the first fetch to the last message decoded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import codec


async def consume(bootstrap: str, prefix: str, count: int, passes: int, timeout: float) -> dict:
    """Read and decode `count` messages `passes` times; the best pass counts."""
    codecs = {f"{prefix}clicks": codec.CLICK, f"{prefix}postbacks": codec.POSTBACK}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in codecs for p in consumer.partitions_for_topic(t)]
        consumer.assign(tps)
        deadline = time.monotonic() + timeout
        runs = []
        for _ in range(passes):
            await consumer.seek_to_beginning(*tps)
            seen, started = 0, time.monotonic()
            while seen < count and time.monotonic() < deadline:
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    decode = codecs[tp.topic].decode
                    for message in messages:
                        decode(message.value)
                    seen += len(messages)
            if seen < count:
                raise TimeoutError(f"decoded {seen} of {count} messages in {timeout:.0f}s")
            runs.append(time.monotonic() - started)
        best = min(runs)
        return {"messages": count, "seconds": best, "per_s": count / best, "passes": runs}
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rawconsumer")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    result = asyncio.run(
        consume(args.bootstrap, args.prefix, args.count, args.passes, args.timeout)
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
