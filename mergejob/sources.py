"""Turn a local folder or a Hub id[@revision] into local files.

Hub sources are fetched with ``huggingface_hub.snapshot_download``, limited to the files a
merge needs; ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_TOKEN`` are honoured by the client.
The resolved commit hash is kept for the recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mergejob.errors import SourceNotFoundError, TokenError
from mergejob.spec import SourceSpec

# Files a merge needs from a base model: weights, configs, tokenizer, chat template.
BASE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.py",
]
ADAPTER_PATTERNS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
CONFIG_PATTERNS = ["config.json", "generation_config.json"]

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
