"""`pipeline simulate`: realistic clicks and postbacks against a running ingress.

Clicks spread over every campaign and publisher with sub IDs; a share of them
install, some installs go on to purchase (with revenue in the campaign's
currency), and a few postbacks are the mistakes real advertisers make: resent
installs, repeated txn_ids, wrong tokens, forged click IDs. SKAdNetwork
postbacks go to the devices' endpoint as well, over every `[[skan.sources]]`
and `[skan.apps]` entry: signed with the config's `[skan] test_keys` when it
has private ones (verified), unsigned otherwise (invalid_signature), with a few
resent (duplicate), tampered (invalid_signature) and foreign (wrong_ad_network)
ones among them. Prints a summary of HTTP outcomes.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter

import aiohttp
from tqdm import tqdm

from pipeline.config import Settings
from pipeline.core import skan

SKAN_PATH = "/.well-known/skadnetwork/report-attribution/"


def skan_bodies(settings: Settings, rng: random.Random, count: int) -> list[bytes]:
    """`count` SKAdNetwork postback bodies (more with the resent ones), in sending order."""
    config = settings.skan
    sources = sorted(config.sources) or ["12"]
    apps = sorted(config.apps) or ["123456789"]
    networks = sorted(config.ad_network_ids) or ["example123.skadnetwork"]
    bodies = []
    for _ in range(count):
        source = rng.choice(sources)
        postback = {
            "ad-network-id": rng.choice(networks),
            "app-id": int(rng.choice(apps)),
            "transaction-id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "redownload": rng.random() < 0.1,
            "fidelity-type": 1,
            "did-win": rng.random() < 0.9,
        }
        if len(source) >= 2 and (rng.random() < 0.7 or int(source) > 100):
            digits = "".join(rng.choice("0123456789") for _ in range(4 - len(source)))
            index = rng.choice((0, 0, 0, 1, 2))
            postback.update(version="4.0", **{"source-identifier": source + digits})
            postback.update({"source-app-id": 1234567891, "postback-sequence-index": index})
            if index == 0:
                postback["conversion-value"] = rng.choice((0, 0, 0, rng.randrange(64)))
            else:
                postback["coarse-conversion-value"] = rng.choice(("low", "medium", "high"))
        else:
            postback.update(version="3.0", **{"campaign-id": int(source)})
            postback["conversion-value"] = rng.choice((0, rng.randrange(64)))
        if rng.random() < 0.02:
            postback["ad-network-id"] = "other1.skadnetwork"
        signer = config.test_signers.get(skan.KEY_FAMILY[postback["version"]])
        if signer:
            postback = skan.sign(postback, signer)
        if rng.random() < 0.02:  # a field changed after signing
            postback["transaction-id"] = postback["transaction-id"][:-1] + "0"
        bodies.append(json.dumps(postback).encode())
        if rng.random() < 0.03:  # the device sent it twice
            bodies.append(bodies[-1])
    return bodies


async def run(
    settings: Settings,
    url: str,
    clicks: int,
    install_rate: float,
    concurrency: int,
    seed: int | None,
    skan_postbacks: int = 0,
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
        headers = {"Content-Type": "application/json"}
        # one after the other: a resent copy must follow its original
        for body in skan_bodies(settings, rng, skan_postbacks):
            try:
                async with http.post(f"{url}{SKAN_PATH}", data=body, headers=headers) as r:
                    outcomes[f"skan {r.status}"] += 1
            except aiohttp.ClientError as e:
                outcomes[f"error {type(e).__name__}"] += 1
    bar.close()
    for key, count in sorted(outcomes.items()):
        print(f"{key:>20}  {count}")
    return outcomes


def main(settings: Settings, args) -> None:
    """`pipeline simulate`."""
    url = args.url or f"http://{settings.ingress_listen}"
    skan_count = args.clicks // 10 if args.skan is None else args.skan
    asyncio.run(
        run(settings, url, args.clicks, args.install_rate, args.concurrency, args.seed, skan_count)
    )
