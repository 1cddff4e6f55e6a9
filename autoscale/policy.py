"""Replica counts and Serve autoscaling settings for a deployment.

Ray Serve's own queue-length policy does the scaling; this module is the one place that turns
Tandem's `replicas:` block into Serve options (and later feeds it engine signals).
"""

from __future__ import annotations

from typing import Any

from cluster.config import ReplicaSpec

# Window over which Serve averages ongoing requests. Shorter than Serve's 30 s default because LLM
# load changes in bursts, and longer than a typical single completion.
LOOK_BACK_PERIOD_S = 10.0


def deployment_scaling_options(replicas: ReplicaSpec) -> dict[str, Any]:
    """`num_replicas` when the count is fixed, else an `autoscaling_config`."""
    options: dict[str, Any] = {"max_ongoing_requests": replicas.max_ongoing_requests}
    if replicas.min == replicas.max:
        options["num_replicas"] = replicas.min
        return options
    options["autoscaling_config"] = {
        "min_replicas": replicas.min,
        "max_replicas": replicas.max,
        "initial_replicas": replicas.initial,
        "target_ongoing_requests": replicas.target_ongoing_requests,
        "upscale_delay_s": replicas.upscale_delay_s,
        "downscale_delay_s": replicas.downscale_delay_s,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
    }
    return options


def describe(replicas: ReplicaSpec) -> str:
    if replicas.min == replicas.max:
        return f"{replicas.min} replica(s), fixed"
    return (
        f"{replicas.min}..{replicas.max} replicas, autoscaled at "
        f"{replicas.target_ongoing_requests:g} ongoing requests per replica"
    )
