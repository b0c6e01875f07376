"""The launcher's errors: what the API server (or the lack of one) said, as a message that
says what to do next.

Every request goes through :meth:`mergejob.launch.cluster.Cluster.call`, which turns an
``ApiException`` into one of these with :func:`api_error` (by HTTP status) and a connection
failure with :func:`unreachable_error`. All are :class:`~mergejob.errors.MergeJobError`; the
ones a retry cannot fix are :class:`~mergejob.errors.InputError` (exit code 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kubernetes.client.rest import ApiException

from mergejob.errors import InputError, MergeJobError

# The Role that grants the launcher what it needs, named in permission errors.
LAUNCHER_RBAC_HINT = "k8s/base/rbac.yaml"


class ClusterUnreachableError(MergeJobError):
    """The API server did not answer (down, wrong address, network, TLS)."""


class KubeConfigError(InputError):
    """No usable kubeconfig or in-cluster config, or a context that is not there."""


class PermissionDeniedError(InputError):
    """The API server refused the user (401: who you are; 403: what you may do)."""


class AlreadyExistsError(InputError):
    """An object of that name is already there (409)."""


class JobExistsError(AlreadyExistsError):
    """A job of that name is already there."""


class NotFoundError(InputError):
    """The object is not there (404)."""


class JobNotFoundError(NotFoundError):
    """No job of that name in the namespace."""


class InvalidObjectError(InputError):
    """The API server rejected an object as invalid (422) or the request as bad (400)."""


class KubeApiError(MergeJobError):
    """Any other answer of the API server (5xx, 429 after retries, ...)."""


@dataclass(frozen=True)
class Action:
    """What the launcher was doing when a request failed, for the error message."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    def describe(self) -> str:
        """``create configmaps/x in namespace ns``."""
        what = f"{self.resource}/{self.name}" if self.name else self.resource
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.verb} {what}{where}"


def _server_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{exc.status} {exc.reason}".strip()


def api_error(exc: ApiException, action: Action, server: str) -> MergeJobError:
    """Turn an ``ApiException`` into an error whose message says what to do next."""
    message = _server_message(exc)
    if exc.status == 401:
        return PermissionDeniedError(
            f"{server} rejected the credentials (401 Unauthorized) while trying to "
            f"{action.describe()}: the kubeconfig's token or certificate is invalid or "
            "expired; log in to the cluster again or pick another --context"
        )
    if exc.status == 403:
        return PermissionDeniedError(
            f"permission denied: you may not {action.verb} {action.resource}"
            f"{f' in namespace {action.namespace}' if action.namespace else ''} "
            f"(the API server said: {message}). The launcher needs create, get, list, watch "
            "and delete on jobs; create, get, patch and delete on configmaps; get, list, "
            "watch and delete on pods; get on pods/log. Ask a cluster admin to bind the Role "
            f"in {LAUNCHER_RBAC_HINT} in that namespace, or use --namespace for one where "
            "you have those rights"
        )
    if exc.status == 404:
        return NotFoundError(f"{action.describe()}: not found ({message})")
    if exc.status == 409:
        return AlreadyExistsError(f"{action.describe()}: already exists ({message})")
    if exc.status in (400, 422):
        return InvalidObjectError(f"the API server rejected {action.describe()}: {message}")
    return KubeApiError(f"{action.describe()} failed: {message} (HTTP {exc.status})")


def unreachable_error(exc: Exception, server: str) -> ClusterUnreachableError:
    """A connection failure (refused, DNS, TLS) as one line that says what to check."""
    reason = getattr(exc, "reason", None) or exc
    text = " ".join(str(reason).split())
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(
        r"(certificate verify failed[^'\")]*)", text
    )
    detail = match.group(1).strip() if match else text[:200]
    return ClusterUnreachableError(
        f"cannot reach the Kubernetes API server at {server}: {detail}. Check that the "
        "cluster is up and that the kubeconfig names it (--kubeconfig, --context; "
        "`kubectl cluster-info`), or run the job on this machine with `mergejob submit --local`"
    )
