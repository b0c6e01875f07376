"""Logging: plain lines (or JSON lines) in a pod, phases with start, end and duration."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mergejob import settings

log = logging.getLogger("mergejob")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            data.update(extra)
        return json.dumps(data)


def setup_logging(level: int = logging.INFO, fmt: str | None = None) -> None:
    """Configure the ``mergejob`` logger (never the root logger) to write to stderr."""
    fmt = fmt or settings.log_format()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@contextmanager
def phase(name: str, **fields: Any) -> Iterator[None]:
    """Log the start, end and duration of one phase of the job."""
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    log.info(
        "phase %s start%s",
        name,
        f" {extra}" if extra else "",
        extra={"fields": {"phase": name, "event": "start", **fields}},
    )
    started = time.monotonic()
    try:
        yield
    except BaseException:
        seconds = time.monotonic() - started
        log.info(
            "phase %s failed after %.1fs",
            name,
            seconds,
            extra={"fields": {"phase": name, "event": "failed", "seconds": round(seconds, 3)}},
        )
        raise
    seconds = time.monotonic() - started
    log.info(
        "phase %s done in %.1fs",
        name,
        seconds,
        extra={"fields": {"phase": name, "event": "done", "seconds": round(seconds, 3)}},
    )
