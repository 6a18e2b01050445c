"""Python load generators of the callback figures, each run as its own process.

python -m bench.clients raw --url URL --count N --concurrency C
    the callbacks baseline: N GETs to a publisher, C at a time, with a raw
    aiohttp client; prints {"requests", "ok", "seconds", "per_s"}.
python -m bench.clients paced --url INGRESS --ids FILE --rate R --out FILE
    the latency load: one accepted install postback per line of FILE
    ("<key> <click_id>"), sent open-loop at R per second; writes the Unix
    time each was accepted (200) as {key: seconds} to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def raw(url: str, count: int, concurrency: int) -> dict:
    ok, sent = 0, iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def loop() -> None:
            nonlocal ok
            for _ in sent:
                async with http.get(url, allow_redirects=False) as r:
                    await r.read()
                    ok += 200 <= r.status < 300

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.monotonic() - started
    return {"requests": count, "ok": ok, "seconds": seconds, "per_s": ok / seconds}


async def paced(url: str, lines: list[str], rate: float, timeout: float) -> dict:
    accepted: dict[str, float] = {}
    failed = 0
    connector = aiohttp.TCPConnector(limit=512)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as http:

        async def one(key: str, click_id: str) -> None:
            nonlocal failed
            params = {"token": "adv-secret", "click_id": click_id, "event": "install"}
            try:
                async with http.get(f"{url}/postback", params=params) as r:
                    await r.read()
                    if r.status == 200:
                        accepted[key] = time.time()
                    else:
                        failed += 1
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

        start, tasks = time.monotonic(), []
        for i, line in enumerate(lines):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(*line.split())))
        await asyncio.gather(*tasks)
    return {"accepted": accepted, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("raw")
    r.add_argument("--url", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--concurrency", type=int, default=64)
    p = sub.add_parser("paced")
    p.add_argument("--url", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    if args.mode == "raw":
        print(json.dumps(asyncio.run(raw(args.url, args.count, args.concurrency))), flush=True)
    else:
        with open(args.ids) as f:
            lines = [line for line in f.read().splitlines() if line]
        result = asyncio.run(paced(args.url, lines, args.rate, args.timeout))
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
