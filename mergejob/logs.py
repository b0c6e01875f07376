"""Logging: plain lines (or JSON lines) in a pod, phases with start, end and duration, and
the progress lines ``mergejob status`` reads back from a pod's log.

Each progress line is defined once, here: a formatter the writer calls and, beside it, the
parser :mod:`mergejob.launch.status` reads it back with, so the two cannot drift. The
wording is an interface (status, tests and benchmarks match it): change it only with both.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergejob import settings

log = logging.getLogger("mergejob")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

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


def split_line(raw: str) -> tuple[str, dict[str, Any]]:
    """One line of a log back into its message and its fields: a JSON line (as
    :class:`JsonFormatter` writes it) gives both, any other line itself and no fields."""
    line = raw.strip()
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            return str(record.get("message", "")), record
    return line, {}


@contextmanager
def phase(name: str, **fields: Any) -> Iterator[None]:
    """Log the start, end and duration of one phase of the job."""
    log.info(
        phase_start_line(name, fields),
        extra={"fields": {"phase": name, "event": "start", **fields}},
    )
    started = time.monotonic()
    try:
        yield
    except BaseException:
        seconds = time.monotonic() - started
        log.info(
            phase_failed_line(name, seconds),
            extra={"fields": {"phase": name, "event": "failed", "seconds": round(seconds, 3)}},
        )
        raise
    seconds = time.monotonic() - started
    log.info(
        phase_done_line(name, seconds),
        extra={"fields": {"phase": name, "event": "done", "seconds": round(seconds, 3)}},
    )


# ---------------------------------------------------------------------------------------
# Progress lines. The messages are passed to the logger whole (no %-arguments), so a name
# holding "%" is written as it is.


@dataclass(frozen=True)
class PhaseEvent:
    """A phase line: which phase, and ``start``, ``done`` or ``failed``."""

    phase: str
    event: str


_PHASE_LINE = re.compile(r"\bphase (\w+) (start|done in [\d.]+s|failed after [\d.]+s)")


def phase_start_line(name: str, fields: Mapping[str, Any] | None = None) -> str:
    """``phase merge start engine=stream``: a phase begins (with its fields as key=value)."""
    extra = " ".join(f"{k}={v}" for k, v in (fields or {}).items())
    return f"phase {name} start{f' {extra}' if extra else ''}"


def phase_done_line(name: str, seconds: float) -> str:
    """``phase merge done in 12.3s``."""
    return f"phase {name} done in {seconds:.1f}s"


def phase_failed_line(name: str, seconds: float) -> str:
    """``phase merge failed after 12.3s``."""
    return f"phase {name} failed after {seconds:.1f}s"


def parse_phase(line: str) -> PhaseEvent | None:
    """The phase line in ``line`` (any of the three above), else None."""
    match = _PHASE_LINE.search(line)
    return PhaseEvent(match.group(1), match.group(2).split()[0]) if match else None


def phase_from_fields(fields: Mapping[str, Any]) -> PhaseEvent | None:
    """The phase event a JSON line's fields carry (:func:`phase` adds them), else None."""
    if fields.get("phase") and fields.get("event"):
        return PhaseEvent(str(fields["phase"]), str(fields["event"]))
    return None


@dataclass(frozen=True)
class ShardDone:
    """An output shard (an extraction's group: ``unit``) finished: ``done`` of ``total``."""

    done: int
    total: int
    unit: str = "shard"


_SHARD_DONE = re.compile(r"\b(shard|group) (\d+)/(\d+) done")


def shard_done_line(
    done: int, total: int, name: str, seconds: float, *, unit: str = "shard"
) -> str:
    """``shard 3/30 done: model-00003-of-00030.safetensors (41.2s elapsed)``: the stream
    engine's line per output shard (``group 3/30 done: model.layers.1``: an extraction's
    per group)."""
    return f"{unit} {done}/{total} done: {name} ({seconds:.1f}s elapsed)"


def parse_shard_done(line: str) -> ShardDone | None:
    """A shard's line in ``line`` (the stream engine's, or the shard part of an index's
    :func:`index_shard_done_line`), else None."""
    match = _SHARD_DONE.search(line)
    if not match:
        return None
    return ShardDone(int(match.group(2)), int(match.group(3)), match.group(1))


# Every line about one index of an Indexed Job starts ``index i/n:``, its summary
# ``index i/n done``: the index a pod works on can be read from any of them.
_INDEX_NAMED = re.compile(r"\bindex (\d+)/(\d+)(?::| done)")


def parse_index(line: str) -> int | None:
    """The index a line of one index names (``index i/n: ...`` or ``index i/n done``)."""
    match = _INDEX_NAMED.search(line)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class IndexShardDone:
    """One index of ``count`` finished an output shard: ``done`` of its ``total``."""

    index: int
    count: int
    done: int
    total: int
    unit: str = "shard"


_INDEX_SHARD_DONE = re.compile(r"\bindex (\d+)/(\d+): (shard|group) (\d+)/(\d+) done")


def index_shard_done_line(
    index: int, count: int, done: int, total: int, name: str, *, unit: str = "shard"
) -> str:
    """``index 1/4: shard 2/8 done: model-00010-of-00030.safetensors`` (an extraction's
    index: ``group 2/8 done: model.layers.3``)."""
    return f"index {index}/{count}: {unit} {done}/{total} done: {name}"


def parse_index_shard_done(line: str) -> IndexShardDone | None:
    """An index's shard line in ``line``, else None."""
    match = _INDEX_SHARD_DONE.search(line)
    if not match:
        return None
    index, count, unit, done, total = match.groups()
    return IndexShardDone(int(index), int(count), int(done), int(total), unit)


@dataclass(frozen=True)
class IndexDone:
    """One index of ``count`` finished its share; ``summary`` says what it did."""

    index: int
    count: int
    summary: str


_INDEX_DONE = re.compile(r"index (\d+)/(\d+) done(?::(.*))?")


def index_done_line(
    index: int,
    count: int,
    shards: int,
    merged: int,
    resumed: int,
    *,
    unit: str = "shard",
    verb: str = "merged",
) -> str:
    """``index 1/4 done: 8 shard(s), 6 merged, 2 already finished`` (an extraction's index:
    ``8 group(s), 6 extracted``)."""
    return (
        f"index {index}/{count} done: {shards} {unit}(s), "
        f"{merged} {verb}, {resumed} already finished"
    )


def parse_index_done(line: str) -> IndexDone | None:
    """An index's closing line in ``line``, else None (``summary`` is ``done`` when the
    line says no more)."""
    match = _INDEX_DONE.search(line)
    if not match:
        return None
    summary = (match.group(3) or "").strip() or "done"
    return IndexDone(int(match.group(1)), int(match.group(2)), summary)


_FINALISER_WAITING = re.compile(r"finaliser: waiting for index\(es\) \[([\d, ]*)\] of (\d+)")


def finaliser_waiting_line(missing: Sequence[int], count: int) -> str:
    """``finaliser: waiting for index(es) [1, 3] of 4``: index 0's shards are done and it
    waits for the others before it finalises."""
    return f"finaliser: waiting for index(es) {list(missing)} of {count}"


def parse_finaliser_waiting(line: str) -> list[int] | None:
    """The indices the finaliser's line in ``line`` still waits for, else None."""
    match = _FINALISER_WAITING.search(line)
    if not match:
        return None
    return [int(i) for i in match.group(1).split(",") if i.strip()]


_MERGED = re.compile(r"merged model written to (\S+)")


def merged_line(output_dir: Path | str, seconds: float) -> str:
    """``merged model written to /out in 93.0s``: the job's output folder is complete."""
    return f"merged model written to {output_dir} in {seconds:.1f}s"


def parse_merged(line: str) -> str | None:
    """The output folder the merged-model line in ``line`` names, else None."""
    match = _MERGED.search(line)
    return match.group(1) if match else None


_PUBLISHED = re.compile(r"published to (\S+): (\S+)")


def published_line(url: str, where: str) -> str:
    """``published to https://hf.co/org/m: https://hf.co/org/m/commit/abc``: the repo and
    the commit (or pull request) the output went to."""
    return f"published to {url}: {where}"


def parse_published(line: str) -> tuple[str, str] | None:
    """The repo and commit (or pull request) URL the published line in ``line`` names."""
    match = _PUBLISHED.search(line)
    return (match.group(1), match.group(2)) if match else None


@dataclass(frozen=True)
class DownloadDone:
    """A base shard downloaded from the Hub: ``done`` of ``total``, ``nbytes`` bytes."""

    done: int
    total: int
    nbytes: int


_DOWNLOAD_DONE = re.compile(r"\bdownload (\d+)/(\d+) done: \S+ \((\d+) bytes\)")


def download_done_line(done: int, total: int, name: str, nbytes: int) -> str:
    """``download 3/30 done: model-00003-of-00030.safetensors (4983463256 bytes)``: the
    line per base shard a Hub-to-Hub job fetches (:mod:`mergejob.fetch`)."""
    return f"download {done}/{total} done: {name} ({nbytes} bytes)"


def parse_download_done(line: str) -> DownloadDone | None:
    """The download line in ``line``, else None."""
    match = _DOWNLOAD_DONE.search(line)
    if not match:
        return None
    return DownloadDone(int(match.group(1)), int(match.group(2)), int(match.group(3)))


# ---------------------------------------------------------------------------------------
# Secrets: the Hub token never reaches a log line


class _HideSecrets(logging.Filter):
    """Replace the Hub token in any log line (message, arguments, traceback) by ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        return True


def scrub_secrets(text: str) -> str:
    """``text`` with every token of :func:`mergejob.settings.known_secrets` as ``***``: for
    the lines the command prints outside the log (its error line)."""
    for secret in settings.known_secrets():
        text = text.replace(secret, "***")
    return text


def quiet_library_bars() -> None:
    """When mergejob's own bars are off (not a terminal, ``MERGEJOB_DISABLE_PROGRESS_BARS``),
    turn off huggingface_hub's and transformers' bars too, through their own switches: their
    tqdm lines would fill a pod's log with carriage-return noise."""
    if settings.progress_bars_enabled():
        return
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    # transformers copies huggingface_hub's switch when it is imported; once imported it has
    # its own.
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def hide_secrets() -> None:
    """Install the token filter on the ``mergejob`` log handlers (a no-op without a token).

    The tokens are those of :func:`mergejob.settings.known_secrets`; call it after
    :func:`setup_logging`, which replaces the handlers.
    """
    secrets = settings.known_secrets()
    if not secrets:
        return
    for handler in log.handlers:
        handler.addFilter(_HideSecrets(secrets))


def size_text(nbytes: float) -> str:
    """A byte count for people: ``1.4 TB``, ``512.0 MB``, ``12 B`` (powers of ten, as the Hub)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def duration_text(seconds: float) -> str:
    """An estimate's duration for people: ``40 s``, ``12 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
