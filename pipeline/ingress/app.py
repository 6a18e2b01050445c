"""The ingress's wiring and handlers: HTTP in, click and postback events to Kafka.

    GET  /click/{campaign_id}  ─► clicks     (key click_id) ─► 302 to the destination
    GET|POST /postback         ─► postbacks  (key click_id; a reversal's: its conversion_id
                                              or txn_id) ─► 200 accepted | 4xx | 503
    POST /.well-known/skadnetwork/report-attribution/
                               ─► skan-reports (key transaction-id) ─► 200 | 400 | 413 | 503
    GET  /healthz /readyz /metrics
    GET  /openapi.json         deploy/openapi.yaml, as JSON

Answers only after Kafka acknowledged the event (acks=all). Every postback
request, accepted or not, is published to the postbacks topic with its outcome
(or, when Kafka refuses it, spooled locally and republished later), so the
`postbacks` table explains every request; so is every SKAdNetwork postback to
skan-reports, its body verbatim, for the worker to verify (`skan_postbacks`).
Validation is `core.validation`; records are batched into produce requests by `batcher.Batcher`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import time
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import codec, kafka, runtime
from pipeline.adapters.aiohttp import BadRequest, Runner
from pipeline.config import Settings
from pipeline.core import macros, skan, validation
from pipeline.core.validation import Rejected
from pipeline.ingress.batcher import Batcher
from pipeline.ingress.metrics import IngressMetrics
from pipeline.ingress.spool import Spool

log = logging.getLogger(__name__)

TOPICS = ["clicks", "postbacks", "skan-reports"]
SKAN_PATH = "/.well-known/skadnetwork/report-attribution/"
MAX_BODY = 64 * 1024
SETTINGS = web.AppKey("settings", Settings)
PRODUCER = web.AppKey("producer", object)
BATCHER = web.AppKey("batcher", Batcher)
METRICS = web.AppKey("metrics", IngressMetrics)
SPOOL = web.AppKey("spool", Spool)
SKAN_SPOOL = web.AppKey("skan_spool", Spool)
DEV_STATUS = web.AppKey("dev_status", str)
OPENAPI_JSON = web.AppKey("openapi_json", bytes)


_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


class Unavailable(Exception):
    """Kafka did not acknowledge the event in time."""


def error(rejection: Rejected) -> web.Response:
    return web.json_response(rejection.body(), status=rejection.status)


async def publish(app: web.Application, topic: str, key: bytes, value: bytes) -> None:
    """Send and wait for the acks=all acknowledgement; raise Unavailable if none comes."""
    started = time.perf_counter()
    try:
        # bounded by the producer's request_timeout_ms; no wait_for: it costs a task per request
        await app[BATCHER].publish(app[SETTINGS].topic(topic), key, value)
    except (KafkaError, TimeoutError) as e:
        raise Unavailable(f"{type(e).__name__}: {e}") from e
    app[METRICS].publish_latency[topic].observe(time.perf_counter() - started)


def _query(request: web.Request) -> dict[str, str]:
    """The query's parameters: the first value of a repeated name."""
    return dict(request.query)


def _client_ip(request: web.Request) -> str:
    settings = request.app[SETTINGS]
    return validation.client_ip(
        request.remote or "", request.headers.get("X-Forwarded-For"), settings.trusted_proxies
    )


async def click(request: web.Request) -> web.Response:
    settings, metrics = request.app[SETTINGS], request.app[METRICS]
    try:
        campaign, event = validation.click_record(
            settings,
            request.match_info["campaign_id"],
            _query(request),
            _client_ip(request),
            request.headers.get("User-Agent", ""),
        )
    except Rejected as rejection:
        metrics.requests.labels("click", rejection.code).inc()
        return error(rejection)
    location = macros.fill(campaign.destination, event)  # the event has every destination macro
    try:
        await publish(request.app, "clicks", event["click_id"].encode(), codec.CLICK.encode(event))
    except Unavailable as e:
        log.warning("click not published: %s", e)
        metrics.requests.labels("click", "unavailable").inc()
        return error(Rejected(503, "unavailable", "the event store is unavailable; retry"))
    metrics.redirected.inc()
    headers = {"X-Click-Id": event["click_id"], "Cache-Control": "no-store"}
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response(
            {"click_id": event["click_id"], "location": location}, headers=headers
        )
    return web.Response(status=302, headers={**headers, "Location": location})


async def _body_params(request: web.Request) -> dict:
    """The parameters of a POST body, read whole; {} for GET. A form
    (application/x-www-form-urlencoded) is a form; application/json, or a body of
    another type that starts with `{` (JSON sent as text/plain), is JSON."""
    if request.method != "POST" or not request.can_read_body:
        return {}
    try:
        # the whole body, however it arrives (split, slow, chunked), bounded by
        # client_max_size
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Rejected(413, "too_large", f"body is over {MAX_BODY} bytes") from None
    except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError) as e:
        # framing broken mid-body (bad chunk sizes, fewer bytes than Content-Length)
        raise Rejected(
            400, "invalid_request", f"the body could not be read ({type(e).__name__})"
        ) from None
    content_type = request.content_type
    if content_type == "application/json" or (
        content_type != "application/x-www-form-urlencoded" and body.lstrip()[:1] == b"{"
    ):
        try:
            # numbers as their JSON text: revenue keeps its exact decimal, and `1E+2`
            # or `-0` stay what they are (rejected) instead of becoming 100.0 or 0
            data = json.loads(body or b"{}", parse_float=str, parse_int=str)
        except (ValueError, RecursionError):
            raise Rejected(400, "invalid_param", "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise Rejected(400, "invalid_param", "JSON body must be an object")
        return data
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def postback(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    source_ip = _client_ip(request)
    params = _query(request)
    try:
        params.update(await _body_params(request))
        early = None
    except Rejected as rejection:
        early = rejection  # recorded with the query's parameters
    raw = validation.redacted_raw(request.method, request.path, params, settings.redaction)
    record, rejection = validation.postback_record(settings, params, source_ip, raw)
    if early is not None:
        record["outcome"], record["detail"], rejection = early.code, early.detail, early
    return await _logged(app, record, rejection)


async def _logged(app: web.Application, record: dict, rejection: Rejected | None) -> web.Response:
    """Publish the postback's record (spooled when Kafka refuses it); the answer."""
    metrics = app[METRICS]
    key, value = validation.record_key(record), codec.POSTBACK.encode(record)
    try:
        await publish(app, "postbacks", key, value)
    except Unavailable as e:
        log.warning("postback %s not published (%s); spooled", record["postback_id"], e)
        record["outcome"] = "unavailable"
        record["detail"] = f"not accepted: Kafka unavailable ({record['detail'] or 'valid'})"
        await asyncio.to_thread(app[SPOOL].append, key, codec.POSTBACK.encode(record))
        metrics.spooled.inc()
        rejection = Rejected(503, "unavailable", "the event store is unavailable; retry later")
    if rejection is not None:
        metrics.requests.labels("postback", rejection.code).inc()
        return error(rejection)
    metrics.accepted.inc()
    # what json_response writes for this dict, without the encoder (postback_id is hex)
    # nor the content type's parsing
    return web.Response(
        body=f'{{"status": "accepted", "postback_id": "{record["postback_id"]}"}}'.encode(),
        headers=_JSON_HEADERS,
    )


async def bad_request(app: web.Application, bad: BadRequest) -> web.Response:
    """A request aiohttp's parser refused (adapters.aiohttp): a JSON 400, and for
    /postback a row with outcome `invalid_request` and what its request line held."""
    settings = app[SETTINGS]
    rejection = Rejected(bad.status, "invalid_request", f"not a valid HTTP request: {bad.reason}")
    try:
        parts = urlsplit(bad.target)
    except ValueError:
        parts = urlsplit("")
    if parts.path != "/postback":
        app[METRICS].requests.labels("other", rejection.code).inc()
        return error(rejection)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    raw = validation.redacted_raw(bad.method, parts.path, params, settings.redaction)
    record, _ = validation.postback_record(settings, params, bad.remote, raw)
    record["outcome"], record["detail"] = rejection.code, rejection.detail
    return await _logged(app, record, rejection)


async def not_found(request: web.Request) -> web.Response:
    """Any other path: 404; a known path with another method: 405 with `Allow`. The
    JSON error body, as for every error."""
    for resource in request.app.router.resources():
        if resource.canonical == "/{path}":
            continue  # this catch-all
        match, allowed = await resource.resolve(request)
        if match is None and allowed:
            detail = f"{request.method} is not allowed on {request.path}"
            response = error(Rejected(405, "method_not_allowed", detail))
            response.headers["Allow"] = ", ".join(sorted(allowed))
            return response
    return error(Rejected(404, "not_found", f"no route {request.method} {request.path}"))


async def skan_report(request: web.Request) -> web.Response:
    """An SKAdNetwork postback from a device: 200 once durably in Kafka whatever the
    worker will find (the device needs no verdict), 400 invalid_json, 413 too_large,
    503 unavailable (then spooled and published later). Every one becomes a report."""
    app, now = request.app, int(time.time() * 1000)
    metrics = app[METRICS]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        body = None
    report, key = skan.report(validation.new_id(now), now, _client_ip(request), body, MAX_BODY)
    try:
        await publish(app, "skan-reports", key, codec.SKAN_REPORT.encode(report))
    except Unavailable as e:
        log.warning("SKAdNetwork postback %s not published (%s); spooled", report["skan_id"], e)
        report["spooled"] = True
        await asyncio.to_thread(app[SKAN_SPOOL].append, key, codec.SKAN_REPORT.encode(report))
        metrics.spooled.inc()
        metrics.requests.labels("skan", "unavailable").inc()
        return error(Rejected(503, "unavailable", "the event store is unavailable; retry later"))
    if report["outcome"]:
        metrics.requests.labels("skan", report["outcome"]).inc()
        status = 413 if report["outcome"] == "too_large" else 400
        return error(Rejected(status, report["outcome"], report["detail"]))
    metrics.requests.labels("skan", "received").inc()
    return web.json_response({"status": "received", "skan_id": report["skan_id"]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 while Kafka is unreachable, or (under `pipeline dev`) a component is down."""
    down = _components_down(request.app[DEV_STATUS])
    if down:
        return web.json_response(
            {"error": "unavailable", "detail": f"components down: {', '.join(down)}"},
            status=503,
        )
    producer = request.app[PRODUCER]
    try:
        ok = await asyncio.wait_for(producer.client.force_metadata_update(), 3)
    except (KafkaError, TimeoutError):
        ok = False
    if not ok:
        return web.json_response(
            {"error": "unavailable", "detail": "not connected to Kafka"}, status=503
        )
    return web.json_response({"status": "ready"})


def _components_down(status_path: str) -> list[str]:
    """What `pipeline dev` last wrote as down ([] when not run by it)."""
    if not status_path:
        return []
    try:
        return json.loads(Path(status_path).read_text()).get("down", [])
    except (OSError, ValueError):
        return ["unknown (no status from pipeline dev)"]


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# deploy/openapi.yaml as JSON (`make openapi`; tests/test_openapi.py checks they agree)
OPENAPI = importlib.resources.files("pipeline.ingress").joinpath("openapi.json")


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_JSON], headers=_JSON_HEADERS)


async def _spool_drainer(app: web.Application) -> None:
    """Every few seconds, republish spooled records once Kafka takes them again."""
    spools = {"postbacks": app[SPOOL], "skan-reports": app[SKAN_SPOOL]}

    def sender(topic: str):
        async def send(key: bytes, value: bytes) -> None:
            await publish(app, topic, key, value)

        return send

    while True:
        await asyncio.sleep(2)
        for topic, spool in spools.items():
            if not spool.pending():
                continue
            try:
                # a broker that lost its topics must not auto-create them with other counts
                await kafka.ensure_topics(app[SETTINGS], TOPICS, timeout=5)
                await spool.drain(sender(topic))
            except (Unavailable, KafkaError, OSError, TimeoutError):
                pass  # still down; the file is kept whole and tried again


async def _kafka_ctx(app: web.Application):
    settings = app[SETTINGS]
    await kafka.ensure_topics(settings, TOPICS)
    # no linger in aiokafka: every request waits for its own record's ack, so a fixed
    # linger would be added to each answer even at full load; the Batcher waits only
    # while its batches are small
    producer = kafka.producer(settings, linger_ms=0)
    await producer.start()
    app[PRODUCER] = producer
    app[BATCHER] = batcher = Batcher(producer)
    drainer = asyncio.create_task(_spool_drainer(app))
    yield
    drainer.cancel()
    await batcher.flush()
    batcher.close()
    await producer.stop()


def build_app(settings: Settings, dev_status: str = "") -> web.Application:
    """The ingress application; Kafka is connected on startup, closed on cleanup.
    `dev_status`: the file where `pipeline dev` says which components are down."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[DEV_STATUS] = dev_status or ""
    app[METRICS] = IngressMetrics()
    app[OPENAPI_JSON] = OPENAPI.read_bytes()
    port = settings.ingress_listen.rpartition(":")[2]
    app[SPOOL] = Spool(Path(settings.spool_dir) / f"ingress-{port}.spool")
    app[SKAN_SPOOL] = Spool(Path(settings.spool_dir) / f"ingress-{port}.skan.spool")
    app.cleanup_ctx.append(_kafka_ctx)
    app.router.add_get("/click/{campaign_id}", click)
    app.router.add_route("GET", "/postback", postback)
    app.router.add_route("POST", "/postback", postback)
    app.router.add_post(SKAN_PATH, skan_report)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_route("*", "/{path:.*}", not_found)  # last: what no route above takes
    return app


def runner(app: web.Application, **kwargs) -> Runner:
    """The runner that serves `app`: requests aiohttp's parser refuses are answered by
    `bad_request`, handler exceptions with a JSON 500."""
    return Runner(app, partial(bad_request, app), **kwargs)


async def run(settings: Settings, dev_status: str | None = None) -> None:
    """Serve on `ingress.listen` until SIGINT or SIGTERM."""
    runner_ = runner(build_app(settings, dev_status or ""), access_log=None)
    await runner_.setup()
    host, _, port = settings.ingress_listen.rpartition(":")
    await web.TCPSite(runner_, host, int(port), backlog=1024).start()
    runtime.settle_heap()
    log.info("ingress listening on http://%s", settings.ingress_listen)
    try:
        await runtime.until_signal()
    finally:
        await runner_.cleanup()


def serve(settings: Settings, dev_status: str | None = None) -> None:
    """`pipeline ingress`."""
    Path(settings.spool_dir).mkdir(parents=True, exist_ok=True)
    asyncio.run(run(settings, dev_status))
