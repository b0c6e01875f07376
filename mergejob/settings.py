"""Every environment variable mergejob reads, in one place.

| variable | meaning |
| --- | --- |
| ``MERGEJOB_CONFIG`` | spec file read by ``mergejob run`` (default ``/etc/mergejob/config.yaml``) |
| ``MERGEJOB_*`` | single-field overrides of the spec for ``mergejob run`` (see ``mergejob.spec``) |
| ``MERGEJOB_LOG_FORMAT`` | ``text`` (default) or ``json`` log lines |
| ``MERGEJOB_DISABLE_PROGRESS_BARS`` | ``1`` turns tqdm bars off (also off when stderr is not a TTY) |
| ``HF_TOKEN`` / ``HF_TOKEN_PATH`` | the Hub token, or a file holding it (a mounted Secret); ``HF_TOKEN`` wins |
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


def hub_token() -> str | None:
    """The Hub token: ``HF_TOKEN``, else the file named by ``HF_TOKEN_PATH`` (a mounted Secret).

    An ``HF_TOKEN_PATH`` that is set but cannot be read is bad input (a Secret that is not
    mounted), reported with the path and never the file's content. Without either, ``None``:
    huggingface_hub then uses its own login, if any.
    """
    from mergejob.errors import TokenError

    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("HF_TOKEN_PATH", "")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        raise TokenError(
            f"HF_TOKEN_PATH={path}: no such file; is the Secret holding the Hub token mounted?"
        ) from None
    except IsADirectoryError:
        raise TokenError(
            f"HF_TOKEN_PATH={path}: is a folder; point it at the file inside the mounted Secret"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise TokenError(f"HF_TOKEN_PATH={path}: cannot read the token file ({reason})") from None
    if not token:
        raise TokenError(f"HF_TOKEN_PATH={path}: the token file is empty")
    return token
