"""Turn a local folder or a Hub id[@revision] into local files.

Hub sources are fetched with ``huggingface_hub.snapshot_download``, limited to the files a
merge needs; ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_TOKEN`` are honoured by the client.
The resolved commit hash is kept for the recipe.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mergejob import settings
from mergejob.errors import SourceNotFoundError, TokenError
from mergejob.spec import SourceSpec

# Files a merge needs from a base model besides its weights: configs, tokenizer, chat
# template (all a plan reads when the headers come over HTTP) ...
BASE_SMALL_PATTERNS = [
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.py",
]
# ... and with the weights.
BASE_PATTERNS = ["*.safetensors", *BASE_SMALL_PATTERNS]
ADAPTER_PATTERNS = [
    settings.ADAPTER_CONFIG_FILE,
    settings.ADAPTER_WEIGHTS_FILE,
    settings.ADAPTER_PICKLE_FILE,
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
CONFIG_PATTERNS = [settings.CONFIG_FILE, settings.GENERATION_CONFIG_FILE]

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedSource:
    """A source as local files, with where it came from."""

    spec: SourceSpec
    local_dir: Path
    repo_id: str | None = None
    commit: str | None = None

    @property
    def display(self) -> str:
        return self.spec.display()


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID_RE.match(text)) and not text.startswith((".", "/", "~"))


def resolve_source(
    spec: SourceSpec,
    *,
    role: str,
    patterns: list[str] | None = None,
    token: str | None = None,
) -> ResolvedSource:
    """Find ``spec`` locally or download it from the Hub; ``role`` names it in errors."""
    local = Path(spec.path).expanduser()
    if local.is_dir():
        if spec.revision:
            raise SourceNotFoundError(
                f"{role} {spec.path}: a revision ({spec.revision}) was given for a local folder; "
                "drop the revision or give a Hub repo id"
            )
        return ResolvedSource(spec=spec, local_dir=local.resolve())
    if local.exists():
        raise SourceNotFoundError(f"{role} {spec.path}: is a file, expected a model folder")
    if not looks_like_repo_id(spec.path):
        raise SourceNotFoundError(
            f"{role} {spec.path}: no such folder, and it is not a Hub repo id; check the path"
        )
    return _download(spec, role=role, patterns=patterns, token=token)


def _download(
    spec: SourceSpec, *, role: str, patterns: list[str] | None, token: str | None
) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            spec.path,
            revision=spec.revision,
            allow_patterns=patterns,
            token=token,
        )
    except RevisionNotFoundError:
        raise SourceNotFoundError(
            f"{role} {spec.path}: revision {spec.revision!r} not found on the Hub"
        ) from None
    except GatedRepoError:
        raise TokenError(
            f"{role} {spec.path}: the repo is gated; accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(
            f"{role} {spec.path}: no such local folder or Hub repo (a private repo needs HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{role} {spec.path}: not a local folder and not in the Hub cache "
            "(HF_HUB_OFFLINE is set, or the Hub cannot be reached)"
        ) from None
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            raise TokenError(f"{role} {spec.path}: the Hub refused the token (401)") from None
        raise
    local_dir = Path(folder)
    commit = local_dir.name if re.fullmatch(r"[0-9a-f]{40}", local_dir.name) else None
    return ResolvedSource(spec=spec, local_dir=local_dir, repo_id=spec.path, commit=commit)


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` ships a tokenizer."""
    return any((Path(folder) / name).is_file() for name in settings.TOKENIZER_MARKERS)


def choose_tokenizer_source(base_dir: Path, adapter_dirs: Iterable[Path]) -> Path | None:
    """The last adapter that ships a tokenizer, else the base (None if neither has one)."""
    chosen: Path | None = None
    for adapter_dir in adapter_dirs:
        if has_tokenizer(adapter_dir):
            chosen = Path(adapter_dir)
    if chosen is None and has_tokenizer(base_dir):
        chosen = Path(base_dir)
    return chosen
