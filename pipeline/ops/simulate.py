"""`pipeline simulate`: realistic clicks and postbacks against a running ingress.

Clicks spread over every campaign and publisher with sub IDs; a share of them
install, some installs go on to purchase (with revenue in the campaign's
currency), and a few postbacks are the mistakes real advertisers make: resent
installs, repeated txn_ids, wrong tokens, forged click IDs. Prints a summary
of HTTP outcomes.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
from tqdm import tqdm

from pipeline.config import Settings


async def run(
    settings: Settings,
    url: str,
    clicks: int,
    install_rate: float,
    concurrency: int,
    seed: int | None,
) -> Counter:
    rng = random.Random(seed)
    campaigns = list(settings.campaigns.values())
    publishers = list(settings.publishers)
    tokens = {a.id: a.token for a in settings.advertisers.values()}
    outcomes: Counter = Counter()
    queue: asyncio.Queue = asyncio.Queue(maxsize=concurrency * 2)
    bar = tqdm(total=clicks, unit="click", desc="simulate")

    async def one(http: aiohttp.ClientSession, n: int) -> None:
        campaign = rng.choice(campaigns)
        params = {
            "pub": rng.choice(publishers),
            "sub1": f"s{rng.randrange(1000)}",
            "sub2": rng.choice(["ios", "android", ""]),
        }
        async with http.get(
            f"{url}/click/{campaign.id}", params=params, headers={"Accept": "application/json"}
        ) as r:
            outcomes[f"click {r.status}"] += 1
            if r.status != 200:
                return
            click_id = (await r.json())["click_id"]
        if rng.random() >= install_rate:
            return
        token = tokens[campaign.advertiser]
        posts = [{"event": "install"}]
        if rng.random() < 0.05:
            posts.append({"event": "install"})  # advertiser resends: duplicate
        if "purchase" in campaign.events and rng.random() < 0.4:
            txn = f"order-{n}-{rng.randrange(10**6)}"
            amount = f"{rng.uniform(0.99, 99.99):.2f}"
            posts.append(
                {
                    "event": "purchase",
                    "txn_id": txn,
                    "revenue": amount,
                    "currency": campaign.currency,
                }
            )
        if rng.random() < 0.02:
            posts.append({"event": "install", "token_override": "wrong-token"})
        if rng.random() < 0.02:
            posts.append({"event": "install", "click_override": click_id[:-4] + "AAAA"})
        for post in posts:
            form = {
                "token": post.pop("token_override", token),
                "click_id": post.pop("click_override", click_id),
                **post,
            }
            async with http.post(f"{url}/postback", data=form) as r:
                outcomes[f"postback {r.status}"] += 1

    async def worker(http: aiohttp.ClientSession) -> None:
        while (n := await queue.get()) is not None:
            try:
                await one(http, n)
            except aiohttp.ClientError as e:
                outcomes[f"error {type(e).__name__}"] += 1
            bar.update(1)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        workers = [asyncio.create_task(worker(http)) for _ in range(concurrency)]
        for n in range(clicks):
            await queue.put(n)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    bar.close()
    for key, count in sorted(outcomes.items()):
        print(f"{key:>20}  {count}")
    return outcomes


def main(settings: Settings, args) -> None:
    """`pipeline simulate`."""
    url = args.url or f"http://{settings.ingress_listen}"
    asyncio.run(run(settings, url, args.clicks, args.install_rate, args.concurrency, args.seed))
