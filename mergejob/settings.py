"""Every environment variable mergejob reads and every file name it uses, in one place.

| variable | meaning |
| --- | --- |
| ``MERGEJOB_CONFIG`` | spec file read by ``mergejob run`` (default ``/etc/mergejob/config.yaml``) |
| ``MERGEJOB_*`` | single-field overrides of the spec for ``mergejob run`` (see ``mergejob.spec``) |
| ``MERGEJOB_LOG_FORMAT`` | ``text`` (default) or ``json`` log lines |
| ``MERGEJOB_DISABLE_PROGRESS_BARS`` | ``1`` turns tqdm bars off (also off when stderr is not a TTY) |
| ``HF_TOKEN`` / ``HF_TOKEN_PATH`` | the Hub token, or a file holding it (a mounted Secret); ``HF_TOKEN`` wins |
| ``JOB_COMPLETION_INDEX``, ``MERGEJOB_INDEX_COUNT`` | this pod's index and the number of indices of an Indexed Job |
| ``KUBECONFIG``, ``KUBERNETES_SERVICE_HOST`` | the launcher's cluster (kubeconfig file, or in-cluster) |
| ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` | honoured through huggingface_hub |
| ``MERGEJOB_TEST_KILL_AT`` | test hook only: the name of a :func:`kill_point` where the process SIGKILLs itself |

And every file name mergejob writes or looks for (``RECIPE_FILE``, ``ADAPTER_WEIGHTS_FILE``...).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Mapping

# The package version (mergejob.__version__ is this; modules read it here, not from the
# package, so that nothing imports the package root back).
VERSION = "0.1.0"

DEFAULT_CONFIG_PATH = "/etc/mergejob/config.yaml"
CONFIG_ENV = "MERGEJOB_CONFIG"


def config_path() -> str:
    """The spec file that ``mergejob run`` reads."""
    return os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_PATH)


KILL_AT_ENV = "MERGEJOB_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """A test hook: SIGKILL this process here when ``MERGEJOB_TEST_KILL_AT`` names this point.

    Called at the steps a crash can fall between (tests/test_kill_points.py kills a merge at
    each and checks that a rerun finishes it); unset, as in every real job, it does nothing.
    """
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
        if looks_like_token(path):
            # Never echo it: it is most likely the token itself, set in the wrong variable.
            raise TokenError(
                "HF_TOKEN_PATH is set but names no file (is it the token itself? put the token "
                "in HF_TOKEN or in a file)"
            ) from None
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


# ---------------------------------------------------------------------------------------
# The spec's environment layer (``mergejob run``): MERGEJOB_<NAME> -> spec field.
SPEC_VARIABLES: dict[str, str] = {
    "MERGEJOB_BASE": "base.path",
    "MERGEJOB_BASE_REVISION": "base.revision",
    "MERGEJOB_TRUST_REMOTE_CODE": "base.trust_remote_code",
    "MERGEJOB_ADAPTERS": "adapters",
    "MERGEJOB_OUTPUT_DIR": "output.dir",
    "MERGEJOB_DTYPE": "output.dtype",
    "MERGEJOB_MAX_SHARD_SIZE": "output.max_shard_size",
    "MERGEJOB_OVERWRITE": "output.overwrite",
    "MERGEJOB_ENGINE": "engine.name",
    "MERGEJOB_DEVICE": "engine.device",
    "MERGEJOB_WORKERS": "engine.workers",
    "MERGEJOB_MAX_MEMORY": "engine.max_memory",
    "MERGEJOB_OFFLOAD_FOLDER": "engine.offload_folder",
    "MERGEJOB_DOWNLOAD_WORKERS": "engine.download_workers",
    "MERGEJOB_DELETE_DOWNLOADED": "engine.delete_downloaded",
    "MERGEJOB_CONFIG_FROM": "config.config_from",
    "MERGEJOB_CONFIG_OVERRIDES": "config.overrides",
    "MERGEJOB_PUBLISH_REPO_ID": "publish.repo_id",
    "MERGEJOB_PUBLISH_PRIVATE": "publish.private",
    "MERGEJOB_PUBLISH_REVISION": "publish.revision",
    "MERGEJOB_PUBLISH_CREATE_PR": "publish.create_pr",
    "MERGEJOB_PUBLISH_COMMIT_MESSAGE": "publish.commit_message",
    "MERGEJOB_PUBLISH_DELETE_UPLOADED": "publish.delete_uploaded",
    # An extraction (the ``extract:`` section): MERGEJOB_FINETUNED makes a job one.
    "MERGEJOB_FINETUNED": "extract.finetuned.path",
    "MERGEJOB_FINETUNED_REVISION": "extract.finetuned.revision",
    "MERGEJOB_MAX_RANK": "extract.max_rank",
    "MERGEJOB_MIN_ENERGY": "extract.min_energy",
    "MERGEJOB_SV_EPSILON": "extract.sv_epsilon",
    "MERGEJOB_DISTRIBUTE_SCALE": "extract.distribute_scale",
    "MERGEJOB_INCLUDE": "extract.include",
    "MERGEJOB_EXCLUDE": "extract.exclude",
    "MERGEJOB_EMBEDDINGS": "extract.embeddings",
    "MERGEJOB_SKIP_UNDECOMPOSABLE": "extract.skip_undecomposable",
    "MERGEJOB_SVD": "extract.svd",
    "MERGEJOB_EXTRACT_DTYPE": "extract.dtype",
}


# ---------------------------------------------------------------------------------------
# File names: every name mergejob writes or looks for, defined once.

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
SINGLE_SAFETENSORS_FILE = "model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_PICKLE_FILE = "adapter_model.bin"  # refused: pickle weights are not read
RECIPE_FILE = "mergejob.yaml"
CARD_FILE = "README.md"
EXTRACTION_REPORT_FILE = "extraction.json"  # an extracted adapter's per-module report
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# A folder that holds one of these ships a tokenizer.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Beside and inside an output folder while a job runs.
PARTIAL_SUFFIX = ".mergejob-partial"  # .NAME.mergejob-partial: the folder being written
PUBLISHED_SUFFIX = ".mergejob-finalized.json"  # .NAME...: this plan is on the Hub already
OLD_SUFFIX = ".mergejob-old"  # .NAME.mergejob-old: the replaced output, between two renames
INDEXES_DIR = ".mergejob-indexes"  # in the partial folder: each finished index's marker
EXTRACT_PARTS_DIR = ".mergejob-parts"  # in the partial folder: an extraction's finished groups
# PEFT saves adapter tensors under the wrapped model's attribute path.
PEFT_PREFIX = "base_model.model."

# ---------------------------------------------------------------------------------------
# An Indexed Job: Kubernetes sets the index; the Job's environment gives the count.

INDEX_ENV = "JOB_COMPLETION_INDEX"
INDEX_COUNT_ENV = "MERGEJOB_INDEX_COUNT"


def environ() -> Mapping[str, str]:
    """The process environment, for the few readers that take a whole mapping (the spec's
    ``MERGEJOB_*`` layer, a child process's environment); read nowhere else."""
    return os.environ


def index_variables(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The raw ``(JOB_COMPLETION_INDEX, MERGEJOB_INDEX_COUNT)`` values ('' where unset)."""
    env = os.environ if env is None else env
    return (env.get(INDEX_ENV) or "").strip(), (env.get(INDEX_COUNT_ENV) or "").strip()


def looks_like_token(value: str) -> bool:
    """Whether ``value`` (given where a file name is expected) looks like a token rather than
    a path: ``hf_...``, or a long run of letters and digits with no folder and no dot."""
    value = value.strip()
    if "/" in value or os.sep in value or "." in value or os.path.exists(value):
        return False
    return value.startswith(("hf_", "api_org_")) or bool(re.fullmatch(r"[\w-]{30,}", value))


def token_source() -> str:
    """Where the Hub token comes from, for messages (never the token itself)."""
    if os.environ.get("HF_TOKEN", "").strip():
        return "HF_TOKEN"
    path = os.environ.get("HF_TOKEN_PATH", "")
    if path and looks_like_token(path):
        return "HF_TOKEN_PATH (which names no file)"
    if path:
        return f"HF_TOKEN_PATH={path}"
    return "the huggingface_hub login (hf auth login)"


def known_secrets() -> list[str]:
    """Every token value the environment holds (``HF_TOKEN`` and the content of
    ``HF_TOKEN_PATH``), for the log filter and for refusing them in objects; never raises."""
    secrets = []
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        secrets.append(token)
    path = os.environ.get("HF_TOKEN_PATH", "")
    if path and looks_like_token(path):
        secrets.append(path.strip())  # the token itself, set where its file belongs
    elif path:
        try:
            with open(path, encoding="utf-8") as handle:
                secrets.append(handle.read().strip())
        except (OSError, UnicodeDecodeError):
            pass  # reported as bad input when the job asks for the token
    return [s for s in secrets if len(s) >= 4]


def kubeconfig_path(explicit: str | None = None) -> str:
    """``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``."""
    return explicit or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod (the service host is set)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
