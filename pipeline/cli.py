"""The `pipeline` command: parses arguments and the config, then hands over.

The only place that reads the command line; everything below gets a frozen
`Settings`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pipeline import config, extras

DEFAULT_CONFIG = "deploy/example.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="Postback attribution pipeline")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the whole pipeline on the embedded stack")
    dev.add_argument("--config", default=DEFAULT_CONFIG)
    dev.add_argument(
        "--publisher",
        default="127.0.0.1:9999",
        help="where a demo publisher prints the callbacks it gets ('' for none)",
    )

    for name, text in [
        ("ingress", "the HTTP ingress"),
        ("sink", "the ClickHouse sink"),
        ("worker", "the attribution worker (Faust)"),
        ("callbacks", "the publisher callbacks service"),
        ("callbacks-replay", "send dead-lettered callbacks round again"),
        ("migrate", "create or upgrade the ClickHouse database"),
    ]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=name != "migrate", default=DEFAULT_CONFIG)
        # how `pipeline dev` hands its embedded endpoints to the children
        cmd.add_argument("--kafka", help="override kafka.bootstrap_servers")
        cmd.add_argument("--clickhouse", help="override clickhouse.url")

    sim = sub.add_parser("simulate", help="realistic traffic against a running ingress")
    sim.add_argument("--config", default=DEFAULT_CONFIG)
    sim.add_argument("--url", help="ingress base URL (default: ingress.listen of the config)")
    sim.add_argument("--clicks", type=int, default=2000)
    sim.add_argument("--install-rate", type=float, default=0.3)
    sim.add_argument("--concurrency", type=int, default=32)
    sim.add_argument("--seed", type=int, default=None)
    return p


def _check_extras(command: str, settings: config.Settings) -> None:
    if command == "dev":
        extras.require("embedded", "pipeline dev")
    if command == "worker" and not settings.worker_store.startswith("memory:"):
        extras.require("rocksdb", f"worker.store = {settings.worker_store!r}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        print(f"pipeline: {e}", file=sys.stderr)
        sys.exit(2)
    if getattr(args, "kafka", None) or getattr(args, "clickhouse", None):
        settings = settings.with_endpoints(kafka=args.kafka, clickhouse=args.clickhouse)
    try:
        _check_extras(args.command, settings)
    except extras.MissingExtra as e:
        print(f"pipeline: {e}", file=sys.stderr)
        sys.exit(2)

    if args.command == "dev":
        from pipeline import dev

        asyncio.run(dev.run(settings, args.config, publisher=args.publisher or None))
    elif args.command == "simulate":
        from pipeline import simulate

        url = args.url or f"http://{settings.ingress_listen}"
        asyncio.run(
            simulate.run(settings, url, args.clicks, args.install_rate, args.concurrency, args.seed)
        )
    else:
        from pipeline import services

        services.serve(args.command, settings)


if __name__ == "__main__":
    main()
