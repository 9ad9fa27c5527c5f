"""What can go wrong in a rollout command, and the exit code each failure means.

::

    RolloutError            a command failed: exit 1
     ├── UsageError          the user asked for something that does not exist or is invalid: exit 2
     └── MissingExtra        the Kubernetes client (the ``k8s`` extra) is not installed: exit 2
    ClusterApiError         the API answered an error (or could not be reached): exit 1
     ├── NotFoundError       404
     └── ConflictError       409: the object changed since it was read (resourceVersion)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: How to get the Kubernetes client, which only the rollout commands need.
K8S_EXTRA = "pip install 'onnxmesh[k8s]'"


class RolloutError(Exception):
    """A rollout command failed; the message says what happened and what to do (exit 1)."""

    exit_code = EXIT_FAILURE


class UsageError(RolloutError):
    """A bad argument or a name that does not exist in the cluster or the spec (exit 2)."""

    exit_code = EXIT_USAGE


class MissingExtra(RolloutError):
    """The kubernetes package is not installed: onnxmesh was installed without the k8s extra (exit 2)."""

    exit_code = EXIT_USAGE


class ClusterApiError(Exception):
    """The Kubernetes API answered with an error or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth asking again: the API was unreachable, overloaded (429) or failing (5xx)."""
        return self.status is None or self.status == 429 or self.status >= 500


class NotFoundError(ClusterApiError):
    """The object does not exist (HTTP 404)."""


class ConflictError(ClusterApiError):
    """The object changed since it was read: its resourceVersion is stale (HTTP 409)."""
