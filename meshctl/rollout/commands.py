"""The rollout commands: set-image (one Deployment, then wait), canary, promote, abort, status.

Each takes the cluster (``ClusterApi``) and where the mesh lives in it (``RolloutSettings``),
prints what it did to ``out`` and returns the exit code; failures are raised as RolloutError
(exit 1) or UsageError (exit 2), for ``meshctl.rollout.cli`` to report.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from meshctl.mesh import kubernetes_name
from meshctl.rollout.cluster import Clock, ClusterApi, Obj
from meshctl.rollout.deployments import (
    CHANGE_CAUSE,
    DEFAULT_POLL_INTERVAL,
    MODEL_VERSION_LABEL,
    PART_OF_SELECTOR,
    VERSION_LABEL,
    image_repository,
    image_tag,
    main_container,
    pod_containers,
    rollout_state,
    wait_for_rollout,
)
from meshctl.rollout.errors import (
    EXIT_OK,
    ClusterApiError,
    ConflictError,
    NotFoundError,
    RolloutError,
    UsageError,
)
from meshctl.rollout.graphs import (
    Branch,
    Mirror,
    RolloutSettings,
    Splitter,
    check_spec,
    mirrors,
    read_spec,
    read_spec_text,
    service_components,
    services_by_graph,
    splitters,
)
from meshctl.rollout.weights import (
    parse_weights,
    resolve_branch_names,
    set_splitter_weights,
    splitter_branches,
)
from orchestrator.spec import MeshSpec

# --------------------------------------------------------------------------------------------
# canary, promote, abort: the weights of one splitter in the ConfigMap


def edit_splitter(
    api: ClusterApi,
    settings: RolloutSettings,
    graph: str,
    step: str,
    choose: Callable[[list[Branch]], dict[str, int]],
    *,
    attempts: int = 5,
) -> tuple[list[Branch], list[Branch]]:
    """Read-modify-write the weights of one splitter in the ConfigMap; returns (before, after).

    ``choose`` turns the current branches into the new weights by branch name. The write is a
    replace carrying the resourceVersion that was read, so a concurrent edit is never lost: on
    a conflict the whole cycle starts again from a fresh read.
    """
    for _ in range(attempts):
        config_map, text = read_spec_text(api, settings)
        before = splitter_branches(text, graph, step)
        new_text = set_splitter_weights(text, graph, step, choose(before))
        after = splitter_branches(new_text, graph, step)
        if new_text == text:
            return before, after
        check_spec(new_text)
        body = copy.deepcopy(config_map)
        body["data"][settings.graphs_key] = new_text
        try:
            api.replace_config_map(settings.configmap, body)
        except ConflictError:
            continue
        return before, after
    raise RolloutError(
        f"ConfigMap {api.namespace}/{settings.configmap} changed on every one of {attempts} attempts; try again"
    )


def _print_weights(
    out: TextIO,
    api: ClusterApi,
    settings: RolloutSettings,
    graph: str,
    step: str,
    before: Sequence[Branch],
    after: Sequence[Branch],
) -> None:
    total = sum(b.weight for b in after)
    for old, new in zip(before, after, strict=True):
        share = 100 * new.weight / total if total else 0
        print(f"  {new.name}: {old.weight} -> {new.weight} ({share:.0f}%)", file=out)
    if [b.weight for b in before] == [b.weight for b in after]:
        print(f"{graph}/{step}: weights unchanged; nothing written.", file=out)
    else:
        print(
            f"{graph}/{step}: ConfigMap {api.namespace}/{settings.configmap} updated. The orchestrators "
            "reload the spec when the kubelet refreshes the mounted file (usually within a minute); "
            "no pod restarts.",
            file=out,
        )


def cmd_canary(
    api: ClusterApi, settings: RolloutSettings, graph: str, step: str, weights_text: str, out: TextIO
) -> int:
    """Set some or all branch weights of one splitter step."""
    wanted = parse_weights(weights_text)
    before, after = edit_splitter(
        api, settings, graph, step, lambda branches: resolve_branch_names(wanted, branches)
    )
    _print_weights(out, api, settings, graph, step, before, after)
    return EXIT_OK


def cmd_promote(
    api: ClusterApi, settings: RolloutSettings, graph: str, step: str, branch: str | None, out: TextIO
) -> int:
    """Send all of a splitter's traffic to its canary branch."""

    def choose(branches: list[Branch]) -> dict[str, int]:
        names = [b.name for b in branches]
        if branch is not None:
            if branch not in names:
                raise UsageError(
                    f"splitter {graph}/{step} has no branch {branch!r} (branches: {', '.join(names)})"
                )
            target = branch
        elif len(names) == 2:
            target = names[1]
        else:
            raise UsageError(f"splitter {graph}/{step} has {len(names)} branches; say which with --branch")
        return {n: 100 if n == target else 0 for n in names}

    before, after = edit_splitter(api, settings, graph, step, choose)
    _print_weights(out, api, settings, graph, step, before, after)
    stable, promoted = after[0], next(b for b in after if b.weight)
    if promoted.name != stable.name:
        _print_promote_hint(api, settings, graph, step, stable, promoted, out)
    return EXIT_OK


def _print_promote_hint(
    api: ClusterApi,
    settings: RolloutSettings,
    graph: str,
    step: str,
    stable: Branch,
    promoted: Branch,
    out: TextIO,
) -> None:
    # To finish, the stable Deployment takes the canary's image and traffic goes back to it;
    # name the exact commands when the cluster tells us the images.
    try:
        spec = read_spec(api, settings)
        components = service_components(spec, _read_optional(api, settings.orchestrator))
        stable_dep = components.get(stable.service or "")
        canary_dep = components.get(promoted.service or "")
        image = main_container(api.read_deployment(canary_dep))["image"] if canary_dep else None
    except (RolloutError, ClusterApiError, KeyError):
        return
    if stable_dep and image:
        print(
            f"To finish: onnxmesh rollout set-image {stable_dep} {image} && "
            f"onnxmesh rollout abort {graph} {step}",
            file=out,
        )


def cmd_abort(api: ClusterApi, settings: RolloutSettings, graph: str, step: str, out: TextIO) -> int:
    """Send all of a splitter's traffic back to its stable (first) branch."""
    before, after = edit_splitter(
        api,
        settings,
        graph,
        step,
        lambda branches: {b.name: 100 if i == 0 else 0 for i, b in enumerate(branches)},
    )
    _print_weights(out, api, settings, graph, step, before, after)
    return EXIT_OK


def _read_optional(api: ClusterApi, name: str) -> Obj | None:
    try:
        return api.read_deployment(name)
    except ClusterApiError:
        return None


# --------------------------------------------------------------------------------------------
# set-image: one Deployment to a new image, then wait


def cmd_set_image(
    api: ClusterApi,
    settings: RolloutSettings,
    component: str,
    image: str,
    *,
    container: str | None,
    timeout: float,
    clock: Clock,
    out: TextIO,
    err: TextIO,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> int:
    """Roll one Deployment to a new image (a new model version) and wait for it."""
    tag = image_tag(image)
    try:
        deployment = api.read_deployment(component)
    except NotFoundError:
        raise UsageError(_no_such_deployment(api, component)) from None
    target = main_container(deployment, container)
    previous = str(target.get("image", ""))
    if previous and image_repository(previous) != image_repository(image):
        print(f"warning: {component} ran {previous}; {image} is a different repository", file=err)
    patch: Obj = {
        "metadata": {"annotations": {CHANGE_CAUSE: f"onnxmesh rollout set-image {component} {image}"}},
        "spec": {
            "template": {
                "metadata": {"labels": {MODEL_VERSION_LABEL: tag, VERSION_LABEL: tag}},
                "spec": {"containers": [{"name": target["name"], "image": image}]},
            }
        },
    }
    patched = api.patch_deployment(component, patch)
    generation = patched["metadata"].get("generation")
    print(
        f"deployment {api.namespace}/{component}: {previous or '?'} -> {image} (model version {tag})",
        file=out,
    )

    def progress(message: str) -> None:
        print(f"  waiting: {message}", file=out)

    try:
        wait_for_rollout(
            api,
            component,
            timeout=timeout,
            clock=clock,
            poll_interval=poll_interval,
            generation=generation,
            on_progress=progress,
        )
    except RolloutError as exc:
        raise RolloutError(f"{exc}\n{_undo_hint(api, settings, component, previous)}") from None
    print(f"deployment {api.namespace}/{component}: rollout complete", file=out)
    return EXIT_OK


def _no_such_deployment(api: ClusterApi, component: str) -> str:
    """Say which Deployments there are, and which one was probably meant (model_a -> model-a)."""
    message = f"no deployment {component!r} in namespace {api.namespace}"
    try:
        names = sorted(str(d["metadata"]["name"]) for d in api.list_deployments(PART_OF_SELECTOR))
    except ClusterApiError:
        return message
    if not names:
        return f"{message}, and no onnxmesh Deployment at all: is the mesh deployed there (-n NAMESPACE)?"
    guess = kubernetes_name(component) if kubernetes_name(component) in names else None
    guess = guess or next(iter(difflib.get_close_matches(component, names, n=1)), None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return f"{message}{hint} (Deployments: {', '.join(names)})"


def _undo_hint(api: ClusterApi, settings: RolloutSettings, component: str, previous: str) -> str:
    lines = [
        "The pods of the previous version keep serving (maxUnavailable: 0). To undo:",
        f"  kubectl -n {api.namespace} rollout undo deployment/{component}",
    ]
    if previous:
        lines.append(f"  onnxmesh rollout set-image {component} {previous}")
    # If a splitter sends traffic to this Deployment as a canary, moving traffic back is the
    # fastest way out: name the exact steps.
    try:
        spec = read_spec(api, settings)
        components = service_components(spec, _read_optional(api, settings.orchestrator))
    except (RolloutError, ClusterApiError):
        return "\n".join(lines)
    for split in splitters(spec):
        if any(components.get(b.service or "") == component for b in split.branches[1:]):
            lines.append(
                f"  onnxmesh rollout abort {split.graph} {split.step}   (traffic back to the stable branch)"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# status


@dataclass
class ComponentStatus:
    """One Deployment as `status` reports it."""

    name: str
    image: str
    model_version: str
    desired: int
    ready: int
    updated: int
    available: int
    rollout: str
    spec_services: list[str]
    graphs: list[str]


@dataclass
class MeshStatus:
    """What `status` reports: the Deployments, the splitters, and what could not be read."""

    namespace: str
    components: list[ComponentStatus]
    splitters: list[Splitter]
    mirrors: list[Mirror]
    #: Spec service name -> Deployment, for naming a splitter's targets.
    service_components: dict[str, str]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "components": [asdict(c) for c in self.components],
            "splitters": [asdict(s) for s in self.splitters],
            "mirrors": [asdict(m) for m in self.mirrors],
            "service_components": self.service_components,
            "notes": self.notes,
        }


def collect_status(api: ClusterApi, settings: RolloutSettings) -> MeshStatus:
    """Read every Deployment of the mesh and the graph spec."""
    notes: list[str] = []
    deployments = sorted(api.list_deployments(PART_OF_SELECTOR), key=lambda d: str(d["metadata"]["name"]))
    spec: MeshSpec | None = None
    try:
        spec = read_spec(api, settings)
    except (RolloutError, ClusterApiError) as exc:
        notes.append(f"graph spec unavailable: {exc}")
    orchestrator = next((d for d in deployments if d["metadata"]["name"] == settings.orchestrator), None)
    components = service_components(spec, orchestrator)
    graphs_of = services_by_graph(spec) if spec is not None else {}

    rows = []
    for dep in deployments:
        name = dep["metadata"]["name"]
        try:
            image = str(main_container(dep).get("image", "?"))
        except UsageError:
            image = ", ".join(str(c.get("image")) for c in pod_containers(dep))
        status = dep.get("status") or {}
        template_labels = dep["spec"]["template"].get("metadata", {}).get("labels", {})
        state = rollout_state(dep)
        services = sorted(s for s, c in components.items() if c == name)
        rows.append(
            ComponentStatus(
                name=name,
                image=image,
                model_version=str(template_labels.get(MODEL_VERSION_LABEL, "-")),
                desired=int(dep["spec"].get("replicas", 1)),
                ready=int(status.get("readyReplicas", 0)),
                updated=int(status.get("updatedReplicas", 0)),
                available=int(status.get("availableReplicas", 0)),
                rollout=("FAILED: " if state.failed else "") + state.message,
                spec_services=services,
                graphs=sorted(g for g, used in graphs_of.items() if used & set(services)),
            )
        )
    return MeshStatus(
        namespace=api.namespace,
        components=rows,
        splitters=splitters(spec) if spec is not None else [],
        mirrors=mirrors(spec) if spec is not None else [],
        service_components=components,
        notes=notes,
    )


def format_status(status: MeshStatus) -> str:
    """The text `status` prints: a table of Deployments, graphs by component, splitters."""
    lines: list[str] = []
    if not status.components:
        lines.append(f"no onnxmesh deployments in namespace {status.namespace} ({PART_OF_SELECTOR})")
    else:
        table = [("COMPONENT", "IMAGE", "MODEL-VERSION", "READY", "UP-TO-DATE", "AVAILABLE", "ROLLOUT")]
        for c in status.components:
            ready = f"{c.ready}/{c.desired}"
            table.append(
                (c.name, c.image, c.model_version, ready, str(c.updated), str(c.available), c.rollout)
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
        ]
    used = [c for c in status.components if c.spec_services]
    if used:
        lines += ["", "GRAPHS BY COMPONENT"]
        for c in used:
            lines.append(f"  {c.name} ({', '.join(c.spec_services)}): {', '.join(c.graphs) or '(no graph)'}")
    if status.splitters:
        lines += ["", "SPLITTERS"]
        lines += [f"  {s.describe(status.service_components)}" for s in status.splitters]
    if status.mirrors:
        lines += ["", "MIRRORS"]
        lines += [f"  {m.describe(status.service_components)}" for m in status.mirrors]
    lines += [f"note: {note}" for note in status.notes]
    return "\n".join(lines) + "\n"


def cmd_status(api: ClusterApi, settings: RolloutSettings, output: str, out: TextIO) -> int:
    """Print the mesh's Deployments, which graphs use them, splitter weights and mirrors."""
    status = collect_status(api, settings)
    if output == "json":
        out.write(json.dumps(status.to_json(), indent=2) + "\n")
    else:
        out.write(format_status(status))
    return EXIT_OK
