"""Accelerator specs -> Ray Serve replica options.

One place decides what a replica asks Ray for: CPUs, GPUs, Ascend NPUs (Ray's `NPU` resource),
an accelerator type, node labels, and placement-group bundles so that a tensor-parallel group of
`count` devices sits on one node (STRICT_PACK).

The options follow Ray Serve 2.60's rules (`ray.serve._private.config.ReplicaConfig`):

- Without bundles the replica actor carries everything: `num_cpus`, `num_gpus` or
  `resources: {NPU: n}`, `accelerator_type` (Ray turns it into the node resource
  `accelerator_type:<type>`) and `label_selector`.
- With bundles (count > 1) Serve creates a placement group per replica and pins the actor to
  bundle 0, so the actor's demands must fit bundle 0. Ray places the group by the bundles alone:
  the node labels go into `placement_group_bundle_label_selector` (one selector per bundle; an
  actor `label_selector` would not steer the group and would leave the actor pending forever on a
  wrongly labelled node), and the accelerator type goes into bundle 0 as
  `accelerator_type:<type>: 0.001` (the amount Ray itself uses), or the actor's own
  `accelerator_type` could not fit bundle 0.
- `max_replicas_per_node` is rejected by Serve together with `placement_group_bundles`:
  `placement_problems` reports it at config-check time, and `replica_options` refuses it.
"""

from __future__ import annotations

from typing import Any

from cluster.config import AcceleratorSpec, ReplicaSpec

# Ray's resource name for Ascend NPUs (ray.util.accelerators / the NPU accelerator manager).
NPU_RESOURCE = "NPU"
# How Ray marks a node's accelerator type: a resource `accelerator_type:<type>` of 1 on the node;
# a task or actor with `accelerator_type=<type>` asks for ACCELERATOR_TYPE_DEMAND of it.
ACCELERATOR_TYPE_PREFIX = "accelerator_type:"
ACCELERATOR_TYPE_DEMAND = 0.001
# Ray Serve's bound for max_replicas_per_node (ray.serve._private.constants).
MAX_REPLICAS_PER_NODE_MAX_VALUE = 100


def device_resource(acc: AcceleratorSpec) -> str | None:
    return {"cpu": None, "gpu": "GPU", "npu": NPU_RESOURCE}[acc.kind]


def uses_placement_group(acc: AcceleratorSpec) -> bool:
    """True when a replica is a tensor-parallel group: a placement group of `count` device bundles."""
    return device_resource(acc) is not None and acc.count > 1


def placement_problems(
    acc: AcceleratorSpec,
    replicas: ReplicaSpec | None = None,
    acc_path: str = "accelerator",
    replicas_path: str = "replicas",
) -> list[str]:
    """Cross-field placement checks Ray Serve would otherwise only fail at deploy time (or never:
    a bad label selector leaves replicas pending). One message per problem, each starting with the
    field's path (`acc_path`/`replicas_path`, e.g. "models[0].accelerator", "models[0].replicas")."""
    from ray._private.label_utils import validate_label_selector

    problems = []
    for key, value in acc.labels.items():
        error = validate_label_selector({key: value})
        if error:
            problems.append(
                f"{acc_path}.labels: {key!r}: {value!r} is not a Ray label selector: {error} "
                "(keys: [prefix/]name; values: v, !v, in(v1,v2), !in(v1,v2))"
            )
    per_node = replicas.max_replicas_per_node if replicas is not None else None
    if per_node is not None:
        if per_node > MAX_REPLICAS_PER_NODE_MAX_VALUE:
            problems.append(
                f"{replicas_path}.max_replicas_per_node: Ray Serve allows at most "
                f"{MAX_REPLICAS_PER_NODE_MAX_VALUE} (got {per_node})"
            )
        if uses_placement_group(acc):
            problems.append(
                f"{replicas_path}.max_replicas_per_node: not allowed with {acc_path}.count {acc.count}: a "
                f"tensor-parallel replica is a placement group of {acc.count} {acc.kind.upper()} bundles "
                "(STRICT_PACK), and Ray Serve rejects max_replicas_per_node together with placement-group "
                f"bundles; remove max_replicas_per_node (got {per_node}), or use count 1"
            )
    return problems


def replica_options(acc: AcceleratorSpec, max_replicas_per_node: int | None = None) -> dict[str, Any]:
    """Options for `serve.deployment(...)`/`.options(...)`: ray_actor_options and, for TP > 1,
    placement_group_bundles + placement_group_strategy (+ placement_group_bundle_label_selector).

    With bundles, Serve schedules the replica actor in bundle 0, so bundle 0 holds the actor's own
    CPUs, first device and accelerator type; the other bundles hold the remaining devices for the
    engine's workers. Raises ValueError for what Serve would reject (see `placement_problems`).
    """
    resource = device_resource(acc)
    pg = uses_placement_group(acc)
    if pg and max_replicas_per_node is not None:
        raise ValueError(
            f"max_replicas_per_node ({max_replicas_per_node}) is not allowed with accelerator count "
            f"{acc.count}: Ray Serve rejects it together with placement-group bundles"
        )

    actor: dict[str, Any] = {"num_cpus": acc.cpus}
    if resource == "GPU":
        actor["num_gpus"] = 1 if pg else acc.count
    elif resource == NPU_RESOURCE:
        actor["resources"] = {NPU_RESOURCE: 1 if pg else acc.count}
    if acc.type:
        actor["accelerator_type"] = acc.type
    if acc.labels and not pg:
        actor["label_selector"] = dict(acc.labels)

    options: dict[str, Any] = {"ray_actor_options": actor}
    if max_replicas_per_node is not None:
        options["max_replicas_per_node"] = max_replicas_per_node
    if pg:
        first: dict[str, float] = {"CPU": acc.cpus, resource: 1}
        if acc.type:
            first[ACCELERATOR_TYPE_PREFIX + acc.type] = ACCELERATOR_TYPE_DEMAND
        bundles = [first] + [{resource: 1} for _ in range(acc.count - 1)]
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = "STRICT_PACK"
        if acc.labels:
            options["placement_group_bundle_label_selector"] = [dict(acc.labels) for _ in bundles]
    return options


def describe(acc: AcceleratorSpec) -> str:
    """A one-line human summary, for `python -m cluster check`."""
    parts = [f"{acc.cpus:g} CPU"]
    if acc.kind != "cpu":
        parts.append(f"{acc.count} x {acc.kind.upper()}{' ' + acc.type if acc.type else ''}")
        if acc.count > 1:
            parts.append("STRICT_PACK bundles (one node)")
    if acc.labels:
        parts.append("node labels " + ", ".join(f"{k}={v}" for k, v in acc.labels.items()))
    return ", ".join(parts)
