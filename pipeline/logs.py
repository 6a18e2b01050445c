"""Log output of every command: text for people, or one JSON object a line.

The JSON form carries the IDs a line is about (`click_id`, `postback_id`,
`conversion_id`, ...) as their own keys, taken from a call's `extra`, so an
operator can follow one conversion through every component's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
IDS = ("click_id", "postback_id", "conversion_id", "txn_id", "adjustment_id", "skan_id", "pub")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def dict_config(level: str, fmt: str) -> dict:
    """The `logging.config.dictConfig` of `level` and `fmt` (Faust's worker takes one)."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
    }


def configure(level: str, fmt: str) -> None:
    """Log to stderr at `level` in `fmt` (both validated by the command line)."""
    logging.config.dictConfig(dict_config(level, fmt))


def level_name(text: str) -> str:
    """argparse type of --log-level: a level name, any case."""
    name = text.upper()
    if name not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return name
