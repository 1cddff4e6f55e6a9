"""Replica counts and Serve autoscaling settings for a deployment, fed by engine signals.

`deployment_scaling_options(replicas)` turns Tandem's `replicas:` block into Ray Serve deployment
options:

- `min == max`: a fixed `num_replicas`.
- otherwise an `autoscaling_config`. Serve's own queue-length policy scales on ongoing requests
  (running at replicas plus queued at handles) against `target_ongoing_requests`. When
  `target_waiting_requests` or `target_kv_cache_usage` is set, the deployment instead runs
  `EngineSignalPolicy`, which also reads what every replica's engine reports through
  `record_autoscaling_stats` (`waiting`, `kv_cache_usage`) and asks for the largest of the counts
  the three signals call for.
- always: a replica being removed (scale-down, redeploy) drains: it takes no new requests and
  finishes the ones in flight, streams included, for up to `drain_timeout_s`.

Serve applies the rest around any policy (deployment-scoped custom policies are wrapped by
`ray.serve.autoscaling_policy._apply_autoscaling_config`): the cold-start fast path (0 replicas and
requests queued at a handle: one replica at once, no delay), `upscale_delay_s` /
`downscale_delay_s` (a decision must hold that long, on wall-clock time), and the min/max bounds.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

from cluster.config import ReplicaSpec

# Window over which Serve averages ongoing requests (and our engine signals). Shorter than Serve's
# 30 s default because LLM load changes in bursts, and longer than a typical single completion.
LOOK_BACK_PERIOD_S = 10.0
# How often handles and replicas push their numbers to Serve's controller. Serve's default, 10 s,
# would add up to 10 s to every reaction (on top of upscale_delay_s), and the first request to a
# deployment scaled to zero is pushed at once anyway. Serve marks the field deprecated in favour of
# environment variables that 2.60 does not read yet; it is still the one that takes effect.
METRICS_INTERVAL_S = 2.0
# While draining, how often a replica checks whether its last request has finished.
DRAIN_POLL_S = 1.0

POLICY_PATH = "autoscale.policy:EngineSignalPolicy"
# Keys of BaseModelServer.record_autoscaling_stats.
WAITING_KEY = "waiting"
KV_CACHE_KEY = "kv_cache_usage"
# Where the policy leaves what each signal asked for (in Serve's policy_state, for debugging).
STATE_KEY = "tandem_desired"


class EngineSignalPolicy:
    """A Serve autoscaling policy: the most replicas any of these signals calls for.

    - ongoing requests: Serve's default policy, called as is
      (`replica_queue_length_autoscaling_policy`: total ongoing / target_ongoing_requests);
    - engine queue: requests waiting in the replicas' engines, summed over replicas, divided by
      `target_waiting_requests` (per replica);
    - KV cache: the replicas' KV-cache usage (0..1), summed, divided by `target_kv_cache_usage`.

    Both engine signals are Serve-aggregated per replica over the look-back window (mean), as the
    ongoing-requests signal is. A replica that has not reported yet counts as 0; with no running
    replicas there is nothing to report, and the ongoing-requests signal (which counts requests
    queued at handles) decides. The result is clamped to the deployment's capacity-adjusted
    min/max; Serve's wrapper applies the delays.

    Serve instantiates the class once per deployment with `policy_kwargs`, and calls it every
    control-loop tick with an `AutoscalingContext`. It is cloudpickled by value, so it must only
    use Ray and the standard library.
    """

    def __init__(self, target_waiting_requests: float | None = None, target_kv_cache_usage: float | None = None):
        if target_waiting_requests is not None and not target_waiting_requests > 0:
            raise ValueError(f"target_waiting_requests must be > 0, got {target_waiting_requests!r}")
        if target_kv_cache_usage is not None and not 0 < target_kv_cache_usage <= 1:
            raise ValueError(f"target_kv_cache_usage must lie in (0, 1], got {target_kv_cache_usage!r}")
        self.target_waiting_requests = target_waiting_requests
        self.target_kv_cache_usage = target_kv_cache_usage

    def desired(self, ctx) -> dict[str, float]:
        """What each signal asks for (replicas, unrounded)."""
        ongoing, _ = replica_queue_length_autoscaling_policy(ctx)
        wanted = {"ongoing": float(ongoing)}
        if ctx.current_num_replicas == 0:
            return wanted  # nothing reports engine stats; Serve's cold-start path covers queued requests
        reported = ctx.aggregated_metrics or {}
        for signal, key, target in (
            ("waiting", WAITING_KEY, self.target_waiting_requests),
            ("kv_cache", KV_CACHE_KEY, self.target_kv_cache_usage),
        ):
            per_replica = reported.get(key)
            if target is not None and per_replica:
                wanted[signal] = sum(v for v in per_replica.values() if v is not None and math.isfinite(v)) / target
        return wanted

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        wanted = self.desired(ctx)
        desired = max(wanted.values())
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        return desired, {STATE_KEY: {k: round(v, 3) for k, v in wanted.items()}}


def policy_kwargs(replicas: ReplicaSpec) -> dict[str, float] | None:
    """EngineSignalPolicy's arguments, or None when no engine signal is configured."""
    kwargs = {}
    if replicas.target_waiting_requests is not None:
        kwargs["target_waiting_requests"] = float(replicas.target_waiting_requests)
    if replicas.target_kv_cache_usage is not None:
        kwargs["target_kv_cache_usage"] = float(replicas.target_kv_cache_usage)
    return kwargs or None


def autoscaling_config(replicas: ReplicaSpec) -> dict[str, Any]:
    """The `autoscaling_config` of a deployment whose replica count varies."""
    config: dict[str, Any] = {
        "min_replicas": replicas.min,
        "max_replicas": replicas.max,
        "initial_replicas": replicas.initial,
        "target_ongoing_requests": replicas.target_ongoing_requests,
        "upscale_delay_s": replicas.upscale_delay_s,
        "downscale_delay_s": replicas.downscale_delay_s,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
        "metrics_interval_s": METRICS_INTERVAL_S,
    }
    kwargs = policy_kwargs(replicas)
    if kwargs is not None:
        config["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": kwargs}
    return config


def deployment_scaling_options(replicas: ReplicaSpec) -> dict[str, Any]:
    """`num_replicas` when the count is fixed, else an `autoscaling_config`; drain settings always."""
    options: dict[str, Any] = {
        "max_ongoing_requests": replicas.max_ongoing_requests,
        "graceful_shutdown_timeout_s": replicas.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        # Bounded per caller: beyond it Serve refuses at once (BackPressureError, a 503 with Retry-After).
        "max_queued_requests": -1 if replicas.max_queued_requests is None else replicas.max_queued_requests,
    }
    if replicas.min == replicas.max:
        options["num_replicas"] = replicas.min
    else:
        options["autoscaling_config"] = autoscaling_config(replicas)
    return options


def describe(replicas: ReplicaSpec) -> str:
    drain = f"drains in-flight requests for up to {replicas.drain_timeout_s:g}s"
    if replicas.min == replicas.max:
        return f"{replicas.min} replica(s), fixed; {drain}"
    signals = [f"{replicas.target_ongoing_requests:g} ongoing requests"]
    if replicas.target_waiting_requests is not None:
        signals.append(f"{replicas.target_waiting_requests:g} engine-queued requests")
    if replicas.target_kv_cache_usage is not None:
        signals.append(f"{replicas.target_kv_cache_usage:.0%} KV-cache usage")
    how = f"autoscaled at {signals[0]} per replica" if len(signals) == 1 else (
        f"autoscaled on engine signals (the most replicas any asks for) at {', '.join(signals)} per replica"
    )
    return (
        f"{replicas.min}..{replicas.max} replicas, {how}; up after {replicas.upscale_delay_s:g}s, "
        f"down after {replicas.downscale_delay_s:g}s; {drain}"
    )
