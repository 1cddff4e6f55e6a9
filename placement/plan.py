"""The placement planner behind `python -m cluster plan FILE` (the command itself: `cluster/plan.py`):
what each replica needs, and where it could go on the current cluster.

For every deployment of every Tandem application in FILE (each base-model pool, each agent, the
gateway) it prints what one replica asks Ray for: CPUs, GPUs / NPUs, accelerator type, node label
selector, tensor-parallel bundles (STRICT_PACK: all on one node), and min/max replicas. The
requirements come from the very options the app builder hands to Ray Serve.

When a Ray cluster is reachable (`--address`, else `$RAY_ADDRESS`, else "auto": the cluster this
machine last started; connecting never starts one) it also lists, per deployment, which alive nodes
could host one replica, and packs every deployment's min replicas onto the nodes (greedy best-fit,
biggest replicas first) using what each node has free now plus what the application's own running
replicas hold (a redeploy replaces them). Whatever cannot be placed is said plainly, with why.

Exit codes: 0 everything placeable (or no cluster reachable: requirements only); 1 the config is
invalid; 2 something cannot be placed on the current nodes.

The core, `plan_placement`, is a pure function over node descriptions (dicts like `ray.nodes()`
returns: NodeID, NodeManagerAddress, Alive, Resources, Labels, plus optional "Available" and
"Reclaimable" resource dicts), so it is tested without Ray.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNPLACEABLE = 2

ACCELERATOR_TYPE_PREFIX = "accelerator_type:"
DEVICE_RESOURCES = ("GPU", "NPU")
_EPS = 1e-9


# -- what a replica needs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """What one replica of a deployment asks Ray for."""

    deployment: str
    what: str  # "model tiny-chat", "model m, pool gpu", "agent a", "gateway"
    bundles: tuple[dict[str, float], ...]  # one bundle for a plain actor; several for a TP placement group
    labels: dict[str, str] = field(default_factory=dict)  # label selector the node must satisfy
    min_replicas: int = 1
    max_replicas: int = 1
    max_replicas_per_node: int | None = None
    strategy: str | None = None  # placement-group strategy; None: a plain actor
    application: str = "default"

    @property
    def per_replica(self) -> dict[str, float]:
        """All bundles together: with STRICT_PACK they must all fit one node."""
        total: dict[str, float] = {}
        for bundle in self.bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        return total

    @property
    def accelerator_type(self) -> str | None:
        return next((k[len(ACCELERATOR_TYPE_PREFIX):] for k in self.per_replica if k.startswith(ACCELERATOR_TYPE_PREFIX)), None)


def requirement_from_options(
    deployment: str, what: str, options: dict[str, Any], min_replicas: int, max_replicas: int, application: str = "default"
) -> Requirement:
    """A Requirement from Serve deployment options (ray_actor_options, placement_group_*)."""
    from ray._common.utils import resources_from_ray_options

    actor = options.get("ray_actor_options") or {}
    if options.get("placement_group_bundles"):
        bundles = tuple(dict(b) for b in options["placement_group_bundles"])
        selectors = options.get("placement_group_bundle_label_selector") or [{}]
        labels = dict(selectors[0])
        strategy = options.get("placement_group_strategy") or "PACK"
    else:
        demand = resources_from_ray_options({"num_cpus": 1, **actor})  # Serve's default: 1 CPU
        bundles = ({k: float(v) for k, v in demand.items() if v},)
        labels = dict(actor.get("label_selector") or {})
        strategy = None
    return Requirement(
        deployment=deployment,
        what=what,
        bundles=bundles,
        labels=labels,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        max_replicas_per_node=options.get("max_replicas_per_node"),
        strategy=strategy,
        application=application,
    )


# -- nodes ----------------------------------------------------------------------------------------


def _shown_resources(resources: dict[str, float]) -> dict[str, float]:
    """The resources worth showing and packing: no placement-group-internal, per-node or memory keys."""
    return {
        k: v
        for k, v in resources.items()
        if "_group_" not in k
        and not k.startswith(("node:", "bundle_group"))
        and k not in ("memory", "object_store_memory")
    }


@dataclass
class Node:
    node_id: str
    ip: str
    labels: dict[str, str]
    total: dict[str, float]
    free: dict[str, float]  # available now + held by the application's own replicas
    available: dict[str, float]
    is_head: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        total = _shown_resources(d.get("Resources") or {})
        available = _shown_resources(d["Available"]) if d.get("Available") is not None else dict(total)
        free = dict(available)
        for k, v in _shown_resources(d.get("Reclaimable") or {}).items():
            free[k] = min(total.get(k, 0.0), free.get(k, 0.0) + v)
        raw = d.get("Resources") or {}
        return cls(
            node_id=d.get("NodeID", "?"),
            ip=d.get("NodeManagerAddress", "?"),
            labels=dict(d.get("Labels") or {}),
            total=total,
            free=free,
            available=available,
            is_head=bool(d.get("IsHead") or "node:__internal_head__" in raw),
        )

    @property
    def short(self) -> str:
        return self.node_id[:8]

    @property
    def name(self) -> str:
        return f"{self.short} ({self.ip}{', head' if self.is_head else ''})"


def label_selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray label-selector semantics: `v` equals, `!v` differs (or absent), `in(a,b)`, `!in(a,b)`."""
    for key, expr in selector.items():
        value = labels.get(key)
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        if body.startswith("in(") and body.endswith(")"):
            hit = value in {v.strip() for v in body[3:-1].split(",")}
        else:
            hit = value == body
        if hit == negate:
            return False
    return True


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + _EPS >= v for k, v in need.items())


# -- packing --------------------------------------------------------------------------------------


@dataclass
class DeploymentPlacement:
    requirement: Requirement
    label_nodes: list[Node]  # alive nodes whose labels match
    capable: list[Node]  # ... and whose totals hold one replica (all bundles on one node)
    free_now: list[Node]  # ... and whose free resources hold one replica now
    placed: dict[str, int] = field(default_factory=dict)  # node id -> min replicas packed there
    problem: str | None = None

    @property
    def placed_count(self) -> int:
        return sum(self.placed.values())


@dataclass
class PlanReport:
    nodes: list[Node]
    placements: list[DeploymentPlacement]

    @property
    def problems(self) -> list[str]:
        return [p.problem for p in self.placements if p.problem]

    @property
    def placeable(self) -> bool:
        return not self.problems


def _fmt_amount(v: float) -> str:
    return f"{v:g}"


def fmt_resources(resources: dict[str, float]) -> str:
    if not resources:
        return "{}"
    order = ["CPU", "GPU", "NPU"]
    keys = sorted(resources, key=lambda k: (order.index(k) if k in order else len(order), k))
    return "{" + ", ".join(f"{k}: {_fmt_amount(resources[k])}" for k in keys) + "}"


def fmt_labels(labels: dict[str, str]) -> str:
    shown = sorted((k, v) for k, v in labels.items() if k != "ray.io/node-id")  # the node id is shown anyway
    return "{" + ", ".join(f"{k}={v}" for k, v in shown) + "}"


def describe_needs(req: Requirement) -> str:
    """E.g. '1 CPU, 2 x GPU H100 on one node (STRICT_PACK)'."""
    need = req.per_replica
    parts = [f"{_fmt_amount(need.get('CPU', 0))} CPU"]
    acc_type = req.accelerator_type
    for dev in DEVICE_RESOURCES:
        if need.get(dev):
            parts.append(f"{_fmt_amount(need[dev])} x {dev}{' ' + acc_type if acc_type else ''}")
    if acc_type and not any(need.get(dev) for dev in DEVICE_RESOURCES):
        parts.append(f"accelerator type {acc_type}")
    others = {k: v for k, v in need.items() if k not in ("CPU", *DEVICE_RESOURCES) and not k.startswith(ACCELERATOR_TYPE_PREFIX)}
    if others:
        parts.append(fmt_resources(others))
    text = ", ".join(parts)
    if len(req.bundles) > 1:
        text += f" on one node ({req.strategy})"
    if req.labels:
        text += f", on nodes labelled {fmt_labels(req.labels)}"
    return text


def _why_incapable(req: Requirement, nodes: list[Node], label_nodes: list[Node]) -> str:
    """Why no alive node can ever hold one replica of `req`."""
    head = f"{req.deployment}: needs {describe_needs(req)}"
    if not nodes:
        return f"{head}; the cluster has no alive node"
    if not label_nodes:
        listing = "; ".join(f"{n.short}: {fmt_labels(n.labels)}" for n in nodes)
        return f"{head}; no alive node has labels matching {fmt_labels(req.labels)}; node labels: {listing}"
    scope = " with those labels" if req.labels else ""
    need = req.per_replica
    acc_type = req.accelerator_type
    acc_key = ACCELERATOR_TYPE_PREFIX + acc_type if acc_type else None
    for dev in DEVICE_RESOURCES:
        if not need.get(dev):
            continue
        typed = [n for n in label_nodes if acc_key is None or n.total.get(acc_key)]
        if any(n.total.get(dev, 0.0) + _EPS >= need[dev] for n in typed):
            continue
        with_dev = [n for n in nodes if n.total.get(dev)]
        listing = (
            "nodes with " + dev + ": " + "; ".join(
                f"{n.short}: {_fmt_amount(n.total[dev])} {dev}, type "
                f"{', '.join(k[len(ACCELERATOR_TYPE_PREFIX):] for k in n.total if k.startswith(ACCELERATOR_TYPE_PREFIX)) or 'none'}"
                f", labels {fmt_labels(n.labels)}"
                for n in with_dev
            )
            if with_dev else f"no node has any {dev}"
        )
        type_text = f" with accelerator type {acc_type}" if acc_type else ""
        one_node = " on one node" if len(req.bundles) > 1 or need[dev] > 1 else ""
        return f"{head}; no node{scope} has {_fmt_amount(need[dev])} {dev}{type_text}{one_node}; {listing}"
    if acc_key and not any(n.total.get(acc_key) for n in label_nodes):
        return f"{head}; no node{scope} has accelerator type {acc_type}"
    lacking = sorted({k for k, v in need.items() for n in label_nodes if n.total.get(k, 0.0) + _EPS < v})
    best = {k: max(n.total.get(k, 0.0) for n in label_nodes) for k in lacking}
    short = ", ".join(f"{_fmt_amount(need[k])} {k} (largest node{scope}: {_fmt_amount(best[k])})" for k in lacking)
    return f"{head}; no node{scope} has all of it at once: {short}"


def _device_mismatch(req: Requirement, node: Node) -> tuple:
    """Best-fit preference: keep accelerator nodes for replicas that need their devices."""
    need = req.per_replica
    foreign = sum(node.total.get(d, 0.0) for d in DEVICE_RESOURCES if not need.get(d))
    return (foreign > 0, foreign)


def plan_placement(requirements: Iterable[Requirement], nodes: Iterable[dict[str, Any]]) -> PlanReport:
    """Where each deployment's replicas could go, and whether all min replicas fit at once.

    `nodes`: dicts like `ray.nodes()` returns (NodeID, NodeManagerAddress, Alive, Resources,
    Labels), optionally with "Available" (free now; default: Resources) and "Reclaimable" (held
    by the application's own replicas, which a redeploy frees). Pure: no Ray calls.
    """
    requirements = list(requirements)
    alive = [Node.from_dict(d) for d in nodes if d.get("Alive", True)]
    placements = []
    for req in requirements:
        need = req.per_replica
        label_nodes = [n for n in alive if label_selector_matches(req.labels, n.labels)]
        capable = [n for n in label_nodes if _fits(need, n.total)]
        free_now = [n for n in capable if _fits(need, n.free)]
        placements.append(DeploymentPlacement(req, label_nodes, capable, free_now))

    # Greedy packing of every deployment's min replicas, biggest replicas first.
    remaining = {n.node_id: dict(n.free) for n in alive}

    def weight(p: DeploymentPlacement) -> tuple:
        # Most devices first, then the most constrained (fewest capable nodes), then most CPU.
        need = p.requirement.per_replica
        return (-sum(need.get(d, 0.0) for d in DEVICE_RESOURCES), len(p.capable), -need.get("CPU", 0.0))

    for p in sorted(placements, key=weight):
        req = p.requirement
        if not p.capable:
            if req.min_replicas > 0:
                p.problem = _why_incapable(req, alive, p.label_nodes)
            continue
        need = req.per_replica
        for _ in range(req.min_replicas):
            candidates = [
                n for n in p.capable
                if _fits(need, remaining[n.node_id])
                and (req.max_replicas_per_node is None or p.placed.get(n.node_id, 0) < req.max_replicas_per_node)
            ]
            if not candidates:
                break
            best = min(
                candidates,
                key=lambda n: (*_device_mismatch(req, n), sum(remaining[n.node_id].get(k, 0.0) - v for k, v in need.items())),
            )
            for k, v in need.items():
                remaining[best.node_id][k] = remaining[best.node_id].get(k, 0.0) - v
            p.placed[best.node_id] = p.placed.get(best.node_id, 0) + 1
        if p.placed_count < req.min_replicas:
            p.problem = _why_short(p, remaining)
    return PlanReport(alive, placements)


def _why_short(p: DeploymentPlacement, remaining: dict[str, dict[str, float]]) -> str:
    req = p.requirement
    head = f"{req.deployment}: only {p.placed_count} of min {req.min_replicas} replicas fit ({describe_needs(req)} each)"
    per_node = req.max_replicas_per_node
    if per_node is not None and per_node * len(p.capable) < req.min_replicas:
        return (
            f"{head}; max_replicas_per_node {per_node} allows at most {per_node * len(p.capable)} on the "
            f"{len(p.capable)} node(s) that can host one: {', '.join(n.short for n in p.capable)}"
        )
    listing = "; ".join(
        f"{n.short} left {fmt_resources({k: max(0.0, remaining[n.node_id].get(k, 0.0)) for k in req.per_replica})}"
        for n in p.capable
    )
    return (
        f"{head}; the {len(p.capable)} node(s) that can host one lack free resources after packing the other "
        f"deployments (free = available now + held by this application's replicas): {listing}"
    )


# -- output ---------------------------------------------------------------------------------------


def format_requirement(req: Requirement) -> list[str]:
    lines = [f"  {req.deployment} ({req.what})"]
    replicas = f"min {req.min_replicas}, max {req.max_replicas} replicas"
    if req.max_replicas_per_node is not None:
        replicas += f", at most {req.max_replicas_per_node} per node"
    lines.append(f"    per replica: {describe_needs(req)}; {replicas}")
    if len(req.bundles) > 1:
        lines.append(f"    TP bundles ({req.strategy}, one node): " + ", ".join(fmt_resources(b) for b in req.bundles))
    else:
        lines.append(f"    Ray resources: {fmt_resources(req.bundles[0])}")
    return lines


def format_node(n: Node) -> str:
    return f"{n.name} labels {fmt_labels(n.labels)} total {fmt_resources(n.total)} available {fmt_resources(n.available)}"


def format_report(report: PlanReport, address: str | None = None) -> str:
    lines = []
    where = f" at {address}" if address else ""
    lines.append(f"cluster{where}: {len(report.nodes)} alive node(s)")
    for n in report.nodes:
        lines.append(f"  {format_node(n)}")
    app = None
    for p in report.placements:
        req = p.requirement
        if req.application != app:
            app = req.application
            lines.append(f"application {app!r}:")
        lines += format_requirement(req)
        if p.free_now:
            lines.append(f"    nodes that could host one replica now: {len(p.free_now)}")
            lines += [f"      {format_node(n)}" for n in p.free_now]
        busy = [n for n in p.capable if n not in p.free_now]
        if busy:
            lines.append(f"    nodes that could host one when freed: {', '.join(n.name for n in busy)}")
        if not p.capable:
            lines.append("    no node can host one replica")
        placed = ", ".join(f"{nid[:8]} x{c}" for nid, c in p.placed.items())
        if req.min_replicas:
            status = "fit" if p.placed_count >= req.min_replicas else "DO NOT FIT"
            lines.append(f"    min replicas: {p.placed_count} of {req.min_replicas} {status}{' (' + placed + ')' if placed else ''}")
    if report.placeable:
        lines.append("placement: every deployment's min replicas fit on the current nodes")
    else:
        lines.append("CANNOT PLACE:")
        lines += [f"  - {problem}" for problem in report.problems]
    return "\n".join(lines)


# -- the live cluster -----------------------------------------------------------------------------


def resolve_address(address: str | None) -> tuple[str | None, str]:
    """(GCS address to connect to or None, how it was found / why none)."""
    given = address or os.environ.get("RAY_ADDRESS") or "auto"
    if given.startswith("ray://"):
        return None, f"{given} is a Ray Client address; give the cluster's GCS address (host:port) instead"
    if given in ("auto", "local"):
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except Exception as e:  # noqa: BLE001 - any failure means: no cluster found
            return None, f"no Ray cluster found on this machine ({e})"
        if not found:
            return None, "no Ray cluster found on this machine (address 'auto')"
        given = found
    host, _, port = given.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            pass
    except (OSError, ValueError) as e:
        return None, f"no Ray cluster reachable at {given} ({e})"
    return given, given


def _held_by_applications(apps: set[str]) -> dict[str, dict[str, float]]:
    """Per node id: resources held by the Serve replicas (and their placement groups) of `apps`."""
    import ray
    import ray._private.state as state
    from ray.core.generated import gcs_pb2

    prefixes = tuple(f"SERVE_REPLICA::{a}#" for a in apps)
    held: dict[str, dict[str, float]] = {}

    def add(node: str, resources: dict[str, float]) -> None:
        slot = held.setdefault(node, {})
        for k, v in resources.items():
            slot[k] = slot.get(k, 0.0) + v

    for pg in ray.util.placement_group_table().values():
        if pg.get("state") == "CREATED" and pg.get("name", "").startswith(prefixes):
            for index, bundle in pg["bundles"].items():
                add(pg["bundles_to_node_id"][index], bundle)
    accessor = state.state._connect_and_get_accessor()
    for raw in accessor.get_actor_table(None, "ALIVE"):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        if actor.name.startswith(prefixes) and not actor.placement_group_id.strip(b"\0"):
            node = (actor.node_id or actor.address.node_id).hex()
            add(node, dict(actor.required_resources))
    return held


def cluster_nodes(applications: Iterable[str] = ()) -> list[dict[str, Any]]:
    """`ray.nodes()` of the connected cluster, with "Available" and "Reclaimable" filled in."""
    import ray
    import ray._private.state as state

    available = state.available_resources_per_node()
    held = _held_by_applications(set(applications)) if applications else {}
    nodes = []
    for d in ray.nodes():
        d = dict(d)
        d["Available"] = available.get(d["NodeID"], {})
        d["Reclaimable"] = held.get(d["NodeID"], {})
        nodes.append(d)
    return nodes


def live_nodes(address: str | None, applications: Iterable[str] = ()) -> tuple[list[dict] | None, str]:
    """Connect (never start) and read the nodes; (None, why) when no cluster is reachable."""
    import ray

    explicit = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized() and not explicit:
        return cluster_nodes(applications), ray.get_runtime_context().gcs_address
    resolved, how = resolve_address(address)
    if resolved is None:
        return None, how
    if ray.is_initialized():
        connected = ray.get_runtime_context().gcs_address
        if connected != resolved:
            return None, f"this process is already connected to the Ray cluster at {connected}, not {resolved}"
        return cluster_nodes(applications), connected
    import logging

    try:
        ray.init(address=resolved, logging_level=logging.WARNING, log_to_driver=False, namespace="tandem-plan")
    except Exception as e:  # noqa: BLE001 - report any connection failure the same way
        return None, f"could not connect to the Ray cluster at {resolved}: {type(e).__name__}: {e}"
    try:
        return cluster_nodes(applications), resolved
    finally:
        ray.shutdown()


__all__ = [
    "DeploymentPlacement",
    "PlanReport",
    "Requirement",
    "format_report",
    "label_selector_matches",
    "live_nodes",
    "plan_placement",
    "requirement_from_options",
]
