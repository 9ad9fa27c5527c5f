"""Deployments: image references, the model-version labels, and judging a rollout as it goes.

A model service's image carries its model, so the image tag is the model version; ``set-image``
writes it into the labels below. ``rollout_state`` judges a Deployment's rollout the way
``kubectl rollout status`` does, and ``wait_for_rollout`` polls until it is done or explains,
pod by pod, why it is not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshctl.rollout.cluster import Clock, ClusterApi, Obj
from meshctl.rollout.errors import ClusterApiError, RolloutError, UsageError

PART_OF_SELECTOR = "app.kubernetes.io/part-of=onnxmesh"
NAME_LABEL = "app.kubernetes.io/name"
VERSION_LABEL = "app.kubernetes.io/version"
MODEL_VERSION_LABEL = "onnxmesh.io/model-version"
CHANGE_CAUSE = "kubernetes.io/change-cause"
DEFAULT_POLL_INTERVAL = 2.0
#: Seconds between reads while the API cannot be reached (an API server restarting, a blip of
#: the network): doubling, then every 8 s, until the wait's own timeout.
OUTAGE_BACKOFF = (1.0, 2.0, 4.0, 8.0)

# Label values: at most 63 characters, alphanumerics with - _ . inside (what a tag must fit).
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
# How many not-ready pods a failure message details; the rest are counted.
_MAX_PODS_REPORTED = 5


def image_tag(image: str) -> str:
    """The tag of an image reference (``registry:5000/onnxmesh/model-a:0.2.0`` -> ``0.2.0``).

    Raises UsageError when there is none: with the model in the image, the tag names the model
    version, and an implicit ``latest`` would make the version label meaningless.
    """
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        raise UsageError(f"image {image!r} has no tag; give one (e.g. {name}:0.2.0): it names the version")
    tag = last.rsplit(":", 1)[1]
    if not _LABEL_VALUE.match(tag):
        raise UsageError(
            f"image tag {tag!r} cannot be a label value (at most 63 characters: letters, digits, "
            "'-', '_', '.'; starting and ending with a letter or digit)"
        )
    return tag


def image_repository(image: str) -> str:
    """An image reference without its tag and digest."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def pod_containers(deployment: Obj) -> list[Obj]:
    """The containers of a Deployment's pod template."""
    return list(deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [])


def main_container(deployment: Obj, wanted: str | None = None) -> Obj:
    """The container that serves: ``wanted``, else the one named like the Deployment or its app."""
    containers = pod_containers(deployment)
    name = deployment["metadata"]["name"]
    if wanted is not None:
        candidates = [c for c in containers if c.get("name") == wanted]
    else:
        app = deployment["metadata"].get("labels", {}).get(NAME_LABEL)
        candidates = [c for c in containers if c.get("name") in (name, app)] or (
            containers if len(containers) == 1 else []
        )
    if len(candidates) != 1:
        names = ", ".join(str(c.get("name")) for c in containers)
        raise UsageError(f"deployment {name}: pick a container with --container (it has: {names})")
    return candidates[0]


def label_selector(deployment: Obj) -> str:
    """The Deployment's pod selector as a label selector string (matchLabels only)."""
    selector = deployment.get("spec", {}).get("selector", {})
    match = selector.get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(match.items()))


@dataclass(frozen=True)
class RolloutState:
    """Where a Deployment's rollout stands: finished, still going, or failed (and why)."""

    done: bool
    failed: bool
    message: str


def rollout_state(deployment: Obj, generation: int | None = None) -> RolloutState:
    """Judge a Deployment's rollout the way ``kubectl rollout status`` does, plus readiness.

    Done means the controller has seen the latest spec (observedGeneration >= ``generation``,
    by default metadata.generation) and every desired replica is updated, ready and available,
    with no old replica left.
    """
    spec = deployment.get("spec", {})
    status = deployment.get("status") or {}
    want_generation = generation if generation is not None else deployment["metadata"].get("generation", 0)
    desired = int(spec.get("replicas", 1))
    # The API leaves out zero counts.
    total = int(status.get("replicas", 0))
    updated = int(status.get("updatedReplicas", 0))
    ready = int(status.get("readyReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    if spec.get("paused"):
        return RolloutState(False, True, "the rollout is paused (kubectl rollout resume to continue)")
    if int(status.get("observedGeneration", 0)) < want_generation:
        return RolloutState(False, False, "waiting for the controller to see the new spec")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, True, f"progress deadline exceeded: {condition.get('message', '')}")
    if updated < desired:
        return RolloutState(False, False, f"{updated} of {desired} replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{total - updated} old replica(s) still running")
    if ready < desired:
        return RolloutState(False, False, f"{ready} of {desired} updated replicas ready")
    if available < desired:
        return RolloutState(False, False, f"{available} of {desired} updated replicas available")
    return RolloutState(True, False, "complete")


def _pod_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def describe_pod_problem(pod: Obj, events: Sequence[Obj]) -> str:
    """Why a pod is not ready, from what the API says: container states, conditions, events."""
    status = pod.get("status", {})
    reasons: list[str] = []
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state", {})
        waiting = state.get("waiting")
        if waiting:
            reasons.append(
                _join(f"{cs.get('name')} waiting: {waiting.get('reason', '')}", waiting.get("message"))
            )
        terminated = (cs.get("lastState") or {}).get("terminated")
        if terminated and cs.get("restartCount", 0):
            reasons.append(
                f"{cs.get('name')} restarted {cs['restartCount']}x, last exit "
                f"{terminated.get('exitCode')} ({terminated.get('reason', '')})"
            )
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("type") in ("PodScheduled", "Ready"):
            text = condition.get("message") or condition.get("reason")
            if text and not (condition.get("type") == "Ready" and reasons):
                reasons.append(f"{condition['type']}=False: {text}")
    warnings = [e for e in events if e.get("type") == "Warning"]
    if warnings:
        last = warnings[-1]
        reasons.append(_join(f"last warning {last.get('reason', '')}", last.get("message")))
    if not reasons:
        reasons.append(f"phase {status.get('phase', 'unknown')}, no reason given yet")
    return "; ".join(reasons)


def _join(head: str, message: object) -> str:
    return f"{head}: {str(message).strip()}" if message else head


def wait_for_rollout(
    api: ClusterApi,
    name: str,
    *,
    timeout: float,
    clock: Clock,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    generation: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Obj:
    """Poll Deployment ``name`` until its rollout is done; returns it.

    An API that cannot be reached, or answers 429 or 5xx, is asked again with back-off
    (``OUTAGE_BACKOFF``) for as long as the timeout allows: the rollout goes on in the cluster
    meanwhile. Raises RolloutError when the rollout fails (paused, progress deadline exceeded)
    or is not done within ``timeout`` seconds; the message names the pods that are not ready
    and why.
    """
    deadline = clock.monotonic() + timeout
    last = ""
    outage: _Outage | None = None
    while True:
        try:
            deployment = api.read_deployment(name)
        except ClusterApiError as exc:
            if not exc.transient:
                raise
            outage = outage or _Outage(clock.monotonic())
            now = clock.monotonic()
            if now >= deadline:
                raise RolloutError(
                    f"deployment {api.namespace}/{name}: not complete after {timeout:g}s, and the "
                    f"Kubernetes API has not answered for the last {now - outage.since:.0f}s ({exc}). "
                    "The rollout goes on in the cluster: see `onnxmesh rollout status` or "
                    f"`kubectl -n {api.namespace} rollout status deployment/{name}`"
                ) from exc
            delay = min(OUTAGE_BACKOFF[min(outage.failures, len(OUTAGE_BACKOFF) - 1)], deadline - now)
            outage.failures += 1
            if on_progress is not None:
                on_progress(f"the Kubernetes API does not answer ({exc}); asking again in {delay:g}s")
            clock.sleep(delay)
            continue
        if outage is not None and on_progress is not None:
            on_progress(f"the Kubernetes API answers again (after {clock.monotonic() - outage.since:.0f}s)")
        outage = None
        state = rollout_state(deployment, generation)
        if state.done:
            return deployment
        if state.message != last and on_progress is not None:
            on_progress(state.message)
        last = state.message
        now = clock.monotonic()
        if state.failed or now >= deadline:
            headline = state.message if state.failed else f"not complete after {timeout:g}s: {state.message}"
            raise RolloutError(
                f"deployment {api.namespace}/{name}: {headline}" + _pod_report(api, deployment)
            )
        clock.sleep(min(poll_interval, deadline - now))


@dataclass
class _Outage:
    """Since when the API has not answered, and how many reads failed."""

    since: float
    failures: int = 0


def _pod_report(api: ClusterApi, deployment: Obj) -> str:
    """The not-ready pods of a Deployment and why, as lines for an error message."""
    try:
        pods = api.list_pods(label_selector(deployment))
    except ClusterApiError as exc:
        return f"\n  (could not list its pods: {exc})"
    stuck = [p for p in pods if not p["metadata"].get("deletionTimestamp") and not _pod_ready(p)]
    if not stuck:
        return ""
    lines = ["", "Pods not ready:"]
    for pod in stuck[:_MAX_PODS_REPORTED]:
        pod_name = pod["metadata"]["name"]
        try:
            events = api.list_events(pod_name)
        except ClusterApiError:
            events = []
        images = ", ".join(c.get("image", "?") for c in pod.get("spec", {}).get("containers") or [])
        lines.append(f"  {pod_name} ({images}): {describe_pod_problem(pod, events)}")
    if len(stuck) > _MAX_PODS_REPORTED:
        lines.append(f"  ... and {len(stuck) - _MAX_PODS_REPORTED} more")
    return "\n".join(lines)
