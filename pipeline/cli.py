"""The `pipeline` command: parses arguments and the config, then runs one command.

The only place that reads the command line; everything below it gets a frozen
`Settings`. Each command is called explicitly below, and imports only what it
runs.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from pipeline import __version__, config, extras, logs

DEFAULT_CONFIG = "deploy/example.toml"
COMPONENTS = {
    "ingress": "the HTTP ingress",
    "worker": "the attribution worker (Faust)",
    "sink": "the ClickHouse sink",
    "callbacks": "the publisher callbacks service",
    "callbacks-replay": "send dead-lettered callbacks round again",
    "migrate": "create or upgrade the ClickHouse database",
}
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="Postback attribution pipeline")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--log-level", type=logs.level_name, default="INFO", metavar="|".join(logs.LEVELS)
    )
    p.add_argument("--log-format", choices=logs.FORMATS, default="text")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the whole pipeline on the embedded stack")
    dev.add_argument("--config", default=DEFAULT_CONFIG)
    dev.add_argument(
        "--publisher",
        default="127.0.0.1:9999",
        help="where a demo publisher prints the callbacks it gets ('' for none)",
    )

    for name, text in COMPONENTS.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=name != "migrate", default=DEFAULT_CONFIG)
        # how `pipeline dev` hands its embedded endpoints to the children
        cmd.add_argument("--kafka", help="override kafka.bootstrap_servers")
        cmd.add_argument("--clickhouse", help="override clickhouse.url")
        if name == "ingress":
            cmd.add_argument("--dev-status", help=argparse.SUPPRESS)  # set by `pipeline dev`

    sim = sub.add_parser("simulate", help="realistic traffic against a running ingress")
    sim.add_argument("--config", default=DEFAULT_CONFIG)
    sim.add_argument("--url", help="ingress base URL (default: ingress.listen of the config)")
    sim.add_argument("--clicks", type=int, default=2000)
    sim.add_argument("--install-rate", type=float, default=0.3)
    sim.add_argument("--concurrency", type=int, default=32)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument(
        "--skan", type=int, default=None, help="SKAdNetwork postbacks (default: clicks / 10)"
    )
    return p


def _fail(message: str) -> None:
    print(f"pipeline: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        _fail(str(e))
    logs.configure(args.log_level, args.log_format, settings.redaction)
    if args.command not in ("dev", "simulate"):
        overrides = dict(
            kafka=getattr(args, "kafka", None), clickhouse=getattr(args, "clickhouse", None)
        )
        settings = settings.with_endpoints(**overrides)
        _check_embedded(settings)
        settings = settings.resolved()
    try:
        _check_extras(args.command, settings)
    except extras.MissingExtra as e:
        _fail(str(e))
    run(args, settings)


def _check_embedded(settings: config.Settings) -> None:
    """A component told to use the embedded stack finds it where `pipeline dev` serves it."""
    for key, value, address in (
        ("kafka.bootstrap_servers", settings.kafka_bootstrap, settings.kafka_embedded_listen),
        ("clickhouse.url", settings.clickhouse_url, settings.clickhouse_embedded_listen),
    ):
        if value != "embedded":
            continue
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            _fail(
                f"{key} is 'embedded', served by `pipeline dev` on {address}, and nothing "
                "answers there: start `pipeline dev`, or give the real address"
            )


def _check_extras(command: str, settings: config.Settings) -> None:
    if command == "dev":
        extras.require("embedded", "pipeline dev")
    if command == "worker" and not settings.worker_store.startswith("memory:"):
        extras.require("rocksdb", f"worker.store = {settings.worker_store!r}")


def run(args: argparse.Namespace, settings: config.Settings) -> None:
    """Run the command of `args` with `settings`."""
    command = args.command
    if command == "ingress":
        from pipeline.ingress import app

        app.serve(settings, dev_status=args.dev_status)
    elif command == "worker":
        from pipeline.worker import app

        app.serve(settings, args.log_level, args.log_format)
    elif command == "sink":
        from pipeline.sink import app

        app.serve(settings)
    elif command == "callbacks":
        from pipeline.callbacks import app

        app.serve(settings)
    elif command == "callbacks-replay":
        from pipeline.callbacks import app

        app.replay(settings)
    elif command == "migrate":
        from pipeline.sink import migrations

        migrations.run(settings)
    elif command == "dev":
        from pipeline.dev import supervisor

        supervisor.main(settings, args)
    elif command == "simulate":
        from pipeline.ops import simulate

        simulate.main(settings, args)
    else:  # pragma: no cover - argparse allows only the commands above
        raise AssertionError(command)


if __name__ == "__main__":
    main()
