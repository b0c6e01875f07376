"""Every environment variable mergejob reads, in one place.

| variable | meaning |
| --- | --- |
| ``MERGEJOB_CONFIG`` | spec file read by ``mergejob run`` (default ``/etc/mergejob/config.yaml``) |
| ``MERGEJOB_*`` | single-field overrides of the spec for ``mergejob run`` (see ``mergejob.spec``) |
| ``MERGEJOB_LOG_FORMAT`` | ``text`` (default) or ``json`` log lines |
| ``MERGEJOB_DISABLE_PROGRESS_BARS`` | ``1`` turns tqdm bars off (also off when stderr is not a TTY) |
| ``HF_TOKEN`` / ``HF_TOKEN_PATH`` | the Hub token, or a file holding it (a mounted Secret) |
| ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` | honoured through huggingface_hub |
"""

from __future__ import annotations

import os
import sys

DEFAULT_CONFIG_PATH = "/etc/mergejob/config.yaml"


def config_path() -> str:
    """The spec file that ``mergejob run`` reads."""
    return os.environ.get("MERGEJOB_CONFIG", DEFAULT_CONFIG_PATH)


def log_format() -> str:
    return os.environ.get("MERGEJOB_LOG_FORMAT", "text").lower()


def progress_bars_enabled() -> bool:
    """tqdm bars on a terminal only; plain log lines in a pod or a pipe."""
    if os.environ.get("MERGEJOB_DISABLE_PROGRESS_BARS", "").lower() in {"1", "true", "yes"}:
        return False
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in {"1", "true", "yes"}:
        return False
    return sys.stderr.isatty()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
