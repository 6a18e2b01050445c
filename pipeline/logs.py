"""Log output of every command: text for people, or one JSON object a line.

The JSON form carries the IDs a line is about (`click_id`, `postback_id`,
`conversion_id`, ...) as their own keys, taken from a call's `extra`, so an
operator can follow one conversion through every component's log.

Every line, of every library's logger, passes `SecretFilter`: the config's
secret values (tokens, click-ID and signing secrets, passwords) and any value
written after a credential-like name (`token=...`) become ***, in the message
and in a traceback alike. Code should not log secrets; this is the backstop.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import time

from pipeline.core.secrets import NONE, Secrets

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
IDS = ("click_id", "postback_id", "conversion_id", "txn_id", "adjustment_id", "skan_id", "pub")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_secrets: Secrets = NONE  # what SecretFilter hides: the loaded config's (configure)


class SecretFilter(logging.Filter):
    """Rewrites each record with its secrets hidden (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = _secrets.hide_named(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _secrets.hide_named(record.exc_text)
        if record.stack_info:
            record.stack_info = _secrets.hide_named(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in IDS:
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_text or record.exc_info:
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def dict_config(level: str, fmt: str) -> dict:
    """The `logging.config.dictConfig` of `level` and `fmt` (Faust's worker takes one)."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"secrets": {"()": SecretFilter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["secrets"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
    }


def configure(level: str, fmt: str, secrets: Secrets | None = None) -> None:
    """Log to stderr at `level` in `fmt` (both validated by the command line), with
    `secrets` (the config's, once loaded) hidden from every line."""
    global _secrets
    if secrets is not None:
        _secrets = secrets
    logging.config.dictConfig(dict_config(level, fmt))


def level_name(text: str) -> str:
    """argparse type of --log-level: a level name, any case."""
    name = text.upper()
    if name not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return name
