"""Accelerator specs -> Ray Serve replica options.

One place decides what a replica asks Ray for: CPUs, GPUs, Ascend NPUs (Ray's `NPU` resource),
an accelerator type, and placement-group bundles so that a tensor-parallel group of `count`
devices sits on one node (STRICT_PACK).
"""

from __future__ import annotations

from typing import Any

from cluster.config import AcceleratorSpec

# Ray's resource name for Ascend NPUs (ray.util.accelerators / the NPU accelerator manager).
NPU_RESOURCE = "NPU"


def device_resource(acc: AcceleratorSpec) -> str | None:
    return {"cpu": None, "gpu": "GPU", "npu": NPU_RESOURCE}[acc.kind]


def replica_options(acc: AcceleratorSpec) -> dict[str, Any]:
    """Options for `serve.deployment(...)`/`.options(...)`: ray_actor_options and, for TP > 1,
    placement_group_bundles + placement_group_strategy.

    With bundles, Serve schedules the replica actor in bundle 0, so bundle 0 holds the actor's own
    CPUs and first device; the other bundles hold the remaining devices for the engine's workers.
    """
    actor: dict[str, Any] = {"num_cpus": acc.cpus}
    resource = device_resource(acc)
    if resource == "GPU":
        actor["num_gpus"] = 1 if acc.count > 1 else acc.count
    elif resource == NPU_RESOURCE:
        actor["resources"] = {NPU_RESOURCE: 1 if acc.count > 1 else acc.count}
    if acc.type:
        actor["accelerator_type"] = acc.type

    options: dict[str, Any] = {"ray_actor_options": actor}
    if resource and acc.count > 1:
        first = {"CPU": acc.cpus, resource: 1}
        options["placement_group_bundles"] = [first] + [{resource: 1} for _ in range(acc.count - 1)]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def describe(acc: AcceleratorSpec) -> str:
    """A one-line human summary, for `python -m cluster check`."""
    parts = [f"{acc.cpus:g} CPU"]
    if acc.kind != "cpu":
        parts.append(f"{acc.count} x {acc.kind.upper()}{' ' + acc.type if acc.type else ''}")
        if acc.count > 1:
            parts.append("STRICT_PACK bundles (one node)")
    return ", ".join(parts)
