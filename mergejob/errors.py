"""The error hierarchy of mergejob.

Every error a user can act on is a :class:`MergeJobError`. Its message says what is wrong
and what to do next; its ``exit_code`` tells a Kubernetes ``podFailurePolicy`` whether a
retry can help: 2 for bad input (never worth a retry), 1 for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class MergeJobError(Exception):
    """Base class of every error mergejob raises on purpose."""

    exit_code: int = EXIT_FAILURE


class InputError(MergeJobError):
    """Bad input: a spec, a path, a file or a flag. Retrying cannot help."""

    exit_code = EXIT_BAD_INPUT


class SpecError(InputError):
    """The job description (flags, spec file or environment) is invalid."""


class SourceNotFoundError(InputError):
    """A base model or adapter could not be found locally or on the Hub."""


class AdapterError(InputError):
    """An adapter folder is broken or describes something mergejob cannot merge."""


class IncompatibleAdapterError(AdapterError):
    """An adapter does not fit the base model (shapes, target modules, vocabulary)."""


class UnsupportedAdapterError(AdapterError):
    """An adapter uses a PEFT method this engine cannot express."""


class ModelError(InputError):
    """The base model folder is broken (config, safetensors headers)."""


class OutputExistsError(InputError):
    """The output folder already holds something and ``--overwrite`` was not given."""


class TokenError(InputError):
    """The Hub token is missing, invalid or lacks the rights the job needs."""


class InputsChangedError(InputError):
    """A rerun from a recipe whose inputs are no longer the bytes it recorded."""


class DtypeRangeError(InputError):
    """The output dtype cannot hold a tensor's values (``--dtype float16`` on a base or a
    merge whose weights go beyond 65504): the same bytes overflow again on a retry."""


class MergeFailedError(MergeJobError):
    """The merge itself failed (for example a NaN appeared); may be worth a retry."""


class PublishError(MergeJobError):
    """Uploading to the Hub failed after the client's own retries."""


def listing(items: Sequence[str], limit: int = 20) -> str:
    """``items`` as indented lines for an error message, the first ``limit`` and a count."""
    shown = "".join(f"\n  {item}" for item in items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more
