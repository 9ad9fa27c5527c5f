"""The seams of the rollout commands: the cluster (``ClusterApi``) and the clock (``Clock``).

The commands reach the Kubernetes API only through ``ClusterApi`` and time only through
``Clock``, so tests drive them with fakes. ``KubernetesClusterApi`` is the real cluster, over the
official client: this is the only module that imports the kubernetes package, and only when a
real cluster is used, since the package is an optional extra (``onnxmesh[k8s]``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from meshctl.rollout.errors import (
    K8S_EXTRA,
    ClusterApiError,
    ConflictError,
    MissingExtra,
    NotFoundError,
)

#: A Kubernetes object as the API returns it in JSON (camelCase keys), e.g. a Deployment.
Obj = dict[str, Any]


class ClusterApi(Protocol):
    """The few Kubernetes API calls the rollout commands need, in one namespace.

    Objects go in and out as plain JSON dictionaries (camelCase, as ``kubectl get -o json``
    prints them), so a fake needs nothing from the kubernetes package.
    """

    namespace: str

    def list_deployments(self, label_selector: str) -> list[Obj]:
        """Deployments matching a label selector (``a=b,c=d``)."""
        ...

    def read_deployment(self, name: str) -> Obj:
        """One Deployment, with its status. Raises NotFoundError."""
        ...

    def patch_deployment(self, name: str, patch: Obj) -> Obj:
        """Apply a strategic merge patch; returns the patched Deployment. Raises NotFoundError."""
        ...

    def list_pods(self, label_selector: str) -> list[Obj]:
        """Pods matching a label selector."""
        ...

    def list_events(self, object_name: str) -> list[Obj]:
        """Events about the object of that name (e.g. a pod's probe failures), oldest first."""
        ...

    def read_config_map(self, name: str) -> Obj:
        """One ConfigMap, with metadata.resourceVersion. Raises NotFoundError."""
        ...

    def replace_config_map(self, name: str, body: Obj) -> Obj:
        """Replace a ConfigMap. Raises ConflictError if body's resourceVersion is stale."""
        ...


class Clock(Protocol):
    """Time for the wait loop: tests pass a fake that advances on sleep."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for that long."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


#: The field manager of every write, so server-side apply names these commands in a conflict
#: (the client's default would be "OpenAPI-Generator").
FIELD_MANAGER = "onnxmesh"


class KubernetesClusterApi:
    """``ClusterApi`` over the official kubernetes client.

    Uses ``kubeconfig`` (default: ``$KUBECONFIG``, else ``~/.kube/config``) with its current
    context (or ``context``), and the in-cluster service account when there is no kubeconfig.
    ``api_client`` replaces all of that (tests point one at a local HTTP server). Responses are
    read as raw JSON rather than client models, so callers see exactly what the API sent, in
    the same shape as ``kubectl -o json``. Every write is made as field manager ``onnxmesh``.
    """

    def __init__(
        self,
        namespace: str,
        context: str | None = None,
        kubeconfig: str | None = None,
        *,
        api_client: Any = None,
    ) -> None:
        # Imported here: the kubernetes package is an optional extra, and only a real cluster needs it.
        try:
            from kubernetes import client
        except ImportError as exc:
            raise MissingExtra(
                f"the rollout commands need the Kubernetes client, which is not installed ({exc}): {K8S_EXTRA}"
            ) from None

        self.namespace = namespace
        api_client = api_client if api_client is not None else _load_api_client(context, kubeconfig)
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = method(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            message = _api_error_message(exc.body) or str(exc.reason)
            error = f"{what}: {message} (HTTP {exc.status})"
            if exc.status == 404:
                raise NotFoundError(error, exc.status) from exc
            if exc.status == 409:
                raise ConflictError(error, exc.status) from exc
            raise ClusterApiError(error, exc.status) from exc
        except (HTTPError, OSError) as exc:
            raise ClusterApiError(f"{what}: cannot reach the Kubernetes API: {exc}") from exc
        data: Obj = json.loads(response.data)
        return data

    def list_deployments(self, label_selector: str) -> list[Obj]:
        found = self._call(
            "list deployments",
            self._apps.list_namespaced_deployment,
            self.namespace,
            label_selector=label_selector,
        )
        return list(found.get("items") or [])

    def read_deployment(self, name: str) -> Obj:
        return self._call(
            f"read deployment {name}", self._apps.read_namespaced_deployment, name, self.namespace
        )

    def patch_deployment(self, name: str, patch: Obj) -> Obj:
        # The client would pick JSON Patch for a dict body; we send a strategic merge patch,
        # which merges containers by name (what `kubectl set image` does).
        return self._call(
            f"patch deployment {name}",
            self._apps.patch_namespaced_deployment,
            name,
            self.namespace,
            patch,
            field_manager=FIELD_MANAGER,
            _content_type="application/strategic-merge-patch+json",
        )

    def list_pods(self, label_selector: str) -> list[Obj]:
        found = self._call(
            "list pods", self._core.list_namespaced_pod, self.namespace, label_selector=label_selector
        )
        return list(found.get("items") or [])

    def list_events(self, object_name: str) -> list[Obj]:
        found = self._call(
            f"list events of {object_name}",
            self._core.list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={object_name}",
        )
        return sorted(found.get("items") or [], key=_event_time)

    def read_config_map(self, name: str) -> Obj:
        return self._call(
            f"read configmap {name}", self._core.read_namespaced_config_map, name, self.namespace
        )

    def replace_config_map(self, name: str, body: Obj) -> Obj:
        return self._call(
            f"replace configmap {name}",
            self._core.replace_namespaced_config_map,
            name,
            self.namespace,
            body,
            field_manager=FIELD_MANAGER,
            _content_type="application/json",
        )


def _load_api_client(context: str | None, kubeconfig: str | None) -> Any:
    """An API client for the kubeconfig (and context), else the pod's service account."""
    from kubernetes import client, config

    # The kubernetes package ships py.typed but leaves its config loaders unannotated.
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        if kubeconfig is not None:
            raise ClusterApiError(f"cannot load kubeconfig {kubeconfig}: {exc}") from exc
        if context is not None:
            raise ClusterApiError(f"cannot load kubeconfig context {context!r}: {exc}") from exc
        # No kubeconfig: inside a pod, use its service account.
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            raise ClusterApiError(f"cannot load a kubeconfig: {exc}") from exc
        return client.ApiClient()


def _api_error_message(body: object) -> str | None:
    """The `message` of a Kubernetes Status error body, if the body is one."""
    if not isinstance(body, str | bytes):
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return None
    message = status.get("message") if isinstance(status, dict) else None
    return message if isinstance(message, str) else None


def _event_time(event: Obj) -> str:
    # RFC 3339 timestamps in UTC sort as strings.
    return str(event.get("lastTimestamp") or event.get("eventTime") or "")
