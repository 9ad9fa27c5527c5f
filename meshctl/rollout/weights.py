"""Editing a splitter's weights in the spec's YAML text, in place.

Only the weight values change: comments, ordering and layout of the ConfigMap survive, and the
result is loaded again and compared with the intended spec before it is returned, so a text
edit can never silently change anything else. This works on the YAML itself (its nodes and
their positions in the text); reading what the spec means is ``meshctl.rollout.graphs``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from meshctl.rollout.errors import RolloutError, UsageError
from meshctl.rollout.graphs import Branch


def _node_get(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    return None


def _walk_nodes(
    node: yaml.Node, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], yaml.MappingNode]]:
    """Every mapping node with its path of keys and indexes, skipping repeated (aliased) nodes."""
    seen: set[int] = set()
    stack: list[tuple[tuple[Any, ...], yaml.Node]] = [(path, node)]
    while stack:
        at, current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            yield at, current
            for k, v in reversed(current.value):
                if isinstance(k, yaml.ScalarNode):
                    stack.append(((*at, k.value), v))
        elif isinstance(current, yaml.SequenceNode):
            for i, v in reversed(list(enumerate(current.value))):
                stack.append(((*at, i), v))


@dataclass
class _SplitterNodes:
    """Where a splitter's branches are in the YAML text, for in-place edits."""

    path: tuple[Any, ...]  # of the step mapping, for checking the edit against the loaded spec
    branches: list[yaml.MappingNode] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    weight_nodes: list[yaml.ScalarNode | None] = field(default_factory=list)


#: What to do when the deployed spec has no splitter at all: the overlays without the canary.
NO_SPLITTER_HINT = (
    "the deployed graph spec has no splitter step, which a canary needs: the dev and production "
    "overlays have none. Apply one with the canary component (kubectl apply -k k8s/overlays/dev-canary), "
    "or add k8s/components/canary to your overlay (docs/kubernetes.md, section 6)"
)


def _graphs_node(text: str) -> yaml.MappingNode:
    """The `graphs:` mapping node of the spec text; RolloutError if the text is no spec."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise RolloutError(f"the graph spec is not valid YAML: {exc}") from exc
    graphs = _node_get(root, "graphs") if root is not None else None
    if not isinstance(graphs, yaml.MappingNode):
        raise RolloutError("the graph spec has no `graphs:` mapping")
    return graphs


def _step_nodes(graph_node: yaml.MappingNode, graph: str) -> list[tuple[tuple[Any, ...], yaml.MappingNode]]:
    """Every step of a graph, nested ones (branches, switch arms) included, with its path.

    Only under `steps:`: the graph's inputs and outputs have names too, but are no steps.
    """
    steps = _node_get(graph_node, "steps")
    if steps is None:
        return []
    return [
        (path, node)
        for path, node in _walk_nodes(steps, ("graphs", graph, "steps"))
        if _scalar(_node_get(node, "name")) is not None
    ]


def splitter_names(text: str) -> list[str]:
    """``graph/step`` of every splitter step in the spec text."""
    graphs = _graphs_node(text)
    return [
        f"{key.value}/{_scalar(_node_get(node, 'name'))}"
        for key, graph_node in graphs.value
        if isinstance(key, yaml.ScalarNode) and isinstance(graph_node, yaml.MappingNode)
        for _, node in _step_nodes(graph_node, str(key.value))
        if _node_get(node, "splitter") is not None
    ]


def _graph_node(text: str, graph: str) -> yaml.MappingNode:
    """The mapping node of ``graph`` in the spec text; RolloutError if the text is no spec."""
    graphs = _graphs_node(text)
    node = _node_get(graphs, graph)
    if node is None:
        names = sorted(str(key.value) for key, _ in graphs.value if isinstance(key, yaml.ScalarNode))
        raise UsageError(f"no graph {graph!r} in the spec (graphs: {', '.join(names)})")
    if not isinstance(node, yaml.MappingNode):
        raise RolloutError(f"graph {graph!r} is not a plain mapping in the spec; edit it by hand")
    return node


def _find_splitter(text: str, graph: str, step: str) -> _SplitterNodes:
    graph_node = _graph_node(text, graph)
    steps = _step_nodes(graph_node, graph)
    named = [(p, n) for p, n in steps if _scalar(_node_get(n, "name")) == step]
    matches = [(p, n) for p, n in named if _node_get(n, "splitter") is not None]
    if not matches:
        known = splitter_names(text)
        where = f"splitter steps in the spec: {', '.join(known)}" if known else NO_SPLITTER_HINT
        if named:
            raise UsageError(f"step {step!r} of graph {graph!r} is not a splitter (no `splitter:`); {where}")
        names = sorted({str(_scalar(_node_get(n, "name"))) for _, n in steps})
        raise UsageError(f"graph {graph!r} has no step {step!r} (its steps: {', '.join(names)}); {where}")
    if len(matches) > 1:
        raise UsageError(f"graph {graph!r} has {len(matches)} splitter steps named {step!r}")
    path, step_node = matches[0]
    splitter_node = _node_get(step_node, "splitter")
    branches_node = _node_get(splitter_node, "branches") if splitter_node is not None else None
    if not isinstance(branches_node, yaml.SequenceNode) or not branches_node.value:
        raise RolloutError(f"splitter {graph}/{step} has no list of branches")
    found = _SplitterNodes(path)
    constructor = yaml.SafeLoader("")  # only its constructor is used, on nodes of `text`
    for i, branch in enumerate(branches_node.value):
        name = _scalar(_node_get(branch, "name"))
        if not isinstance(branch, yaml.MappingNode) or name is None:
            raise RolloutError(f"branch #{i + 1} of splitter {graph}/{step} has no name")
        weight_node = _node_get(branch, "weight")
        weight = constructor.construct_object(weight_node) if weight_node is not None else 0
        if not isinstance(weight_node, yaml.ScalarNode | None) or not _is_weight(weight):
            raise RolloutError(f"branch {name!r} of splitter {graph}/{step} has a bad weight {weight!r}")
        found.branches.append(branch)
        found.names.append(name)
        found.weights.append(int(weight))
        found.weight_nodes.append(weight_node)
    return found


def _scalar(node: yaml.Node | None) -> str | None:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else None


def _is_weight(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def splitter_branches(text: str, graph: str, step: str) -> list[Branch]:
    """The branches of splitter ``step`` in ``graph``; raises UsageError if there is none."""
    found = _find_splitter(text, graph, step)
    services = [_scalar(_node_get(b, "service")) for b in found.branches]
    return [Branch(n, w, s) for n, w, s in zip(found.names, found.weights, services, strict=True)]


def set_splitter_weights(text: str, graph: str, step: str, weights: Mapping[str, int]) -> str:
    """The spec text with the weights of splitter ``step`` in ``graph`` set; nothing else changes.

    The weights are rewritten in place in the text, so comments, ordering and formatting of the
    ConfigMap survive; a branch without a ``weight`` key gets one. Branches not in ``weights``
    keep theirs. The result is parsed again and compared with the intended spec before it is
    returned, so a text edit can never silently change anything else.
    """
    found = _find_splitter(text, graph, step)
    unknown = sorted(set(weights) - set(found.names))
    if unknown:
        raise UsageError(
            f"splitter {graph}/{step} has no branch {', '.join(map(repr, unknown))} "
            f"(branches: {', '.join(found.names)})"
        )
    for name, weight in weights.items():
        if not _is_weight(weight):
            raise UsageError(f"weight of {name!r} must be an integer >= 0, not {weight!r}")
    final = [weights.get(n, w) for n, w in zip(found.names, found.weights, strict=True)]
    if not any(final):
        raise UsageError(f"splitter {graph}/{step} would get no traffic: at least one weight must be > 0")

    edits: list[tuple[int, int, str]] = []
    for branch, name, node in zip(found.branches, found.names, found.weight_nodes, strict=True):
        if name not in weights:
            continue
        value = str(weights[name])
        if node is not None:
            edits.append((node.start_mark.index, node.end_mark.index, value))
        else:
            first_key = branch.value[0][0]
            at = first_key.start_mark.index
            # Put the new key before the first one, in the mapping's own style and indentation.
            insert = (
                f"weight: {value}, "
                if branch.flow_style
                else f"weight: {value}\n{' ' * first_key.start_mark.column}"
            )
            edits.append((at, at, insert))
    new_text = text
    for start, end, value in sorted(edits, reverse=True):
        new_text = new_text[:start] + value + new_text[end:]

    failed = RolloutError(f"editing the weights of {graph}/{step} in place went wrong; nothing was written")
    expected = yaml.safe_load(text)
    try:
        step_obj: Any = expected
        for key in found.path:
            step_obj = step_obj[key]
        for branch_obj in step_obj["splitter"]["branches"]:
            if branch_obj.get("name") in weights:
                branch_obj["weight"] = weights[branch_obj["name"]]
    except (KeyError, IndexError, TypeError):
        # Keys the loader resolves to non-strings (`yes`, `1`) in the path: no safe check possible.
        raise failed from None
    if yaml.safe_load(new_text) != expected:
        raise failed
    return new_text


def parse_weights(text: str) -> dict[str, int]:
    """``a=90,b=10`` -> ``{"a": 90, "b": 10}``; raises UsageError on anything else."""
    weights: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--weights wants BRANCH=WEIGHT[,BRANCH=WEIGHT...], got {text!r}")
        try:
            weight = int(value.strip())
        except ValueError:
            raise UsageError(f"weight of {name!r} must be an integer >= 0, not {value.strip()!r}") from None
        if weight < 0:
            raise UsageError(f"weight of {name!r} must be an integer >= 0, not {weight}")
        if name in weights:
            raise UsageError(f"branch {name!r} is given twice in --weights")
        weights[name] = weight
    return weights


def resolve_branch_names(weights: Mapping[str, int], branches: Sequence[Branch]) -> dict[str, int]:
    """Map ``stable`` / ``canary`` to branch names, when no branch is literally called so.

    ``stable`` is the first branch (where ``abort`` sends traffic); ``canary`` is the other one
    of a two-branch splitter. Real branch names always win.
    """
    names = [b.name for b in branches]
    resolved: dict[str, int] = {}
    for key, weight in weights.items():
        name = key
        if key not in names and key == "stable":
            name = names[0]
        elif key not in names and key == "canary":
            if len(names) != 2:
                raise UsageError(
                    f"'canary' is ambiguous with {len(names)} branches; name one of {', '.join(names)}"
                )
            name = names[1]
        if name in resolved:
            raise UsageError(f"branch {name!r} is given twice in --weights (as {key!r})")
        resolved[name] = weight
    return resolved
