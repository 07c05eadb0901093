"""Logging setup: one line per record, optional JSON, secrets redacted on the way out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from tokenrelay.errors import redact


class RedactingFilter(logging.Filter):
    """Scrubs configured secrets and bearer tokens from every record's final message."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg"}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(level: str = "info", *, json_lines: bool = False,
                      secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter(secrets))
    handler.setFormatter(
        JSONFormatter() if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("tokenrelay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
