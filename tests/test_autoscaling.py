"""Autoscaling on engine signals: the policy against Serve's real context objects, then a real
deployment that scales up under a step load, back down with requests in flight, and from zero."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscale import policy as tandem_policy
from autoscale.policy import EngineSignalPolicy, deployment_scaling_options, describe
from cluster.config import ReplicaSpec

DEPLOYMENT = DeploymentID(name="BaseModel-m", app_name="test")


# -- options -----------------------------------------------------------------------------------------


def test_options_use_serves_default_policy_without_engine_targets():
    opts = deployment_scaling_options(ReplicaSpec(min=1, max=4, drain_timeout_s=45))
    config = AutoscalingConfig(**opts["autoscaling_config"])
    assert config.policy.is_default_policy_function()
    assert opts["graceful_shutdown_timeout_s"] == 45 and opts["graceful_shutdown_wait_loop_s"] > 0
    assert config.look_back_period_s > config.metrics_interval_s

    fixed = deployment_scaling_options(ReplicaSpec(min=2, max=2, drain_timeout_s=30))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["graceful_shutdown_timeout_s"] == 30
    # Queues are bounded by default; null lifts the bound (Serve's -1).
    assert fixed["max_queued_requests"] == 256
    assert deployment_scaling_options(ReplicaSpec(max_queued_requests=None))["max_queued_requests"] == -1
    assert deployment_scaling_options(ReplicaSpec(max_queued_requests=8))["max_queued_requests"] == 8
    assert "fixed" in describe(ReplicaSpec(min=2, max=2))


def test_options_use_engine_signal_policy_with_targets():
    spec = ReplicaSpec(min=0, max=4, target_waiting_requests=3, target_kv_cache_usage=0.75)
    config = AutoscalingConfig(**deployment_scaling_options(spec)["autoscaling_config"])
    assert config.policy.policy_function == tandem_policy.POLICY_PATH
    assert config.policy.policy_kwargs == {"target_waiting_requests": 3.0, "target_kv_cache_usage": 0.75}
    policy = _resolve_policy_callable(config.policy)  # what Serve's controller instantiates
    assert isinstance(policy, EngineSignalPolicy) and policy.target_kv_cache_usage == 0.75
    text = describe(spec)
    assert "engine-queued" in text and "75% KV-cache" in text and "0..4" in text


def test_policy_rejects_bad_targets():
    with pytest.raises(ValueError, match="target_kv_cache_usage"):
        EngineSignalPolicy(target_kv_cache_usage=1.5)
    with pytest.raises(ValueError, match="target_waiting_requests"):
        EngineSignalPolicy(target_waiting_requests=0)


# -- the policy, called the way Serve's controller calls it ---------------------------------------


def _replicas(n: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(n)]


class Deployment:
    """One deployment's autoscaling as the controller runs it: Serve's wrapper around the policy
    (cold start, scaling factors, delays), a fresh AutoscalingContext per tick, and the policy
    state carried from tick to tick."""

    def __init__(self, spec: ReplicaSpec, replicas: int):
        self.config = AutoscalingConfig(**deployment_scaling_options(spec)["autoscaling_config"])
        self.policy = _apply_autoscaling_config(_resolve_policy_callable(self.config.policy))
        self.running = replicas
        self.target = replicas
        self.state: dict = {}

    def tick(self, ongoing: float = 0.0, queued: float = 0.0, waiting=None, kv=None) -> int:
        ids = _replicas(self.running)
        metrics = {}
        if waiting is not None:
            metrics["waiting"] = dict(zip(ids, waiting))
        if kv is not None:
            metrics["kv_cache_usage"] = dict(zip(ids, kv))
        ctx = AutoscalingContext(
            deployment_id=DEPLOYMENT,
            deployment_name=DEPLOYMENT.name,
            app_name=DEPLOYMENT.app_name,
            current_num_replicas=self.running,
            target_num_replicas=self.target,
            running_replicas=ids,
            total_num_requests=ongoing + queued,
            total_queued_requests=queued,
            aggregated_metrics=metrics,
            raw_metrics={},
            capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas,
            policy_state=dict(self.state),
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=time.time(),
            config=self.config,
        )
        decision, self.state = self.policy(ctx)
        self.target = decision
        return decision

    def desired(self) -> dict:
        return self.state.get(tandem_policy.STATE_KEY, {})


@pytest.fixture
def clock(monkeypatch):
    """Serve's delay logic reads time.time() in ray.serve.autoscaling_policy: drive it by hand."""
    import ray.serve.autoscaling_policy as serve_policy

    now = [1000.0]
    monkeypatch.setattr(serve_policy, "time", types.SimpleNamespace(time=lambda: now[0]))
    return now


def spec(**kw) -> ReplicaSpec:
    base = dict(min=1, max=8, target_ongoing_requests=8, upscale_delay_s=0, downscale_delay_s=0, target_waiting_requests=2)
    return ReplicaSpec(**{**base, **kw})


def test_ongoing_requests_only_matches_serves_default_policy(clock):
    ours = Deployment(spec(), replicas=2)
    default = Deployment(spec(target_waiting_requests=None), replicas=2)
    assert default.config.policy.is_default_policy_function()
    # No engine stats reported (yet): the ongoing-requests signal alone, as Serve computes it.
    assert ours.tick(ongoing=40) == default.tick(ongoing=40) == 5
    assert ours.desired() == {"ongoing": 5.0}
    # Engine queues empty: they never hold more replicas than the ongoing requests need.
    assert ours.tick(ongoing=16, waiting=[0, 0, 0, 0, 0]) == default.tick(ongoing=16) == 2


def test_waiting_requests_scale_up_when_ongoing_would_not(clock):
    d = Deployment(spec(target_waiting_requests=2), replicas=2)
    # 8 ongoing requests over 2 replicas is at target; but the engines queue 6 each.
    assert d.tick(ongoing=8, waiting=[6, 6]) == 6
    assert d.desired() == {"ongoing": 1.0, "waiting": 6.0}


def test_kv_cache_usage_scales_up(clock):
    d = Deployment(spec(target_waiting_requests=None, target_kv_cache_usage=0.5), replicas=2)
    assert d.tick(ongoing=4, kv=[0.9, 0.95]) == 4  # 1.85 / 0.5 = 3.7
    assert d.desired()["kv_cache"] == pytest.approx(3.7)
    # Two replicas just started and have not reported: they count as empty.
    d.running = 4
    assert d.tick(ongoing=4, kv=[0.9, 0.95]) == 4
    assert d.tick(ongoing=4, kv=[0.3, 0.3, 0.2, 0.1]) == 2


def test_largest_signal_wins_and_downscale_needs_all_signals_low(clock):
    d = Deployment(spec(target_waiting_requests=2, target_kv_cache_usage=0.8), replicas=4)
    assert d.tick(ongoing=40, waiting=[1, 1, 1, 1], kv=[0.2] * 4) == 5  # ongoing
    d.running = 5
    assert d.tick(ongoing=8, waiting=[0] * 5, kv=[0.9] * 5) == 6  # KV: 4.5 / 0.8 = 5.6
    d.running = 6
    assert d.tick(ongoing=8, waiting=[0] * 6, kv=[0.1] * 6) == 1


def test_delays_hold_decisions_until_they_persist(clock):
    d = Deployment(spec(upscale_delay_s=10, downscale_delay_s=30), replicas=2)
    assert d.tick(ongoing=8, waiting=[4, 4]) == 2  # wants 4, waits 10 s
    clock[0] += 5
    assert d.tick(ongoing=8, waiting=[4, 4]) == 2
    clock[0] += 5
    assert d.tick(ongoing=8, waiting=[4, 4]) == 4
    d.running = 4
    # Load gone: the scale-down decision must hold for 30 s.
    clock[0] += 1
    assert d.tick(ongoing=0, waiting=[0] * 4) == 4
    clock[0] += 20
    assert d.tick(ongoing=0, waiting=[0] * 4) == 4
    # A burst in between resets the count-down ...
    clock[0] += 1
    assert d.tick(ongoing=8, waiting=[2, 2, 2, 2]) == 4
    clock[0] += 20
    assert d.tick(ongoing=0, waiting=[0] * 4) == 4
    clock[0] += 29
    assert d.tick(ongoing=0, waiting=[0] * 4) == 4
    # ... then 30 s of quiet: down to min.
    clock[0] += 1
    assert d.tick(ongoing=0, waiting=[0] * 4) == 1


def test_clamped_to_min_and_max(clock):
    d = Deployment(spec(min=2, max=3), replicas=2)
    assert d.tick(ongoing=100, waiting=[50, 50]) == 3
    assert d.desired()["waiting"] == 50.0  # the policy saw it; the bounds cut it
    d.running = 3
    assert d.tick(ongoing=0, waiting=[0, 0, 0]) == 2


def test_scale_from_zero_on_requests_queued_at_handles(clock):
    d = Deployment(spec(min=0, max=4, upscale_delay_s=60, downscale_delay_s=5), replicas=0)
    assert d.tick() == 0  # nothing asked: stays at zero
    # A request queued at a handle (no replica to run it): one replica at once, no upscale delay.
    assert d.tick(queued=1) == 1
    d.running = 1
    assert d.tick(ongoing=1, waiting=[0]) == 1
    # Idle again: back to zero after downscale_delay_s (Serve only goes to zero from one replica).
    assert d.tick() == 1
    clock[0] += 5
    assert d.tick() == 0


# -- on the session's Ray cluster -------------------------------------------------------------------

APP = "autoscale-test"
BURST = "BaseModel-as-burst"
ZERO = "BaseModel-as-zero"
QUESTION = [{"role": "user", "content": "Tell me about the ocean."}]
AUTOSCALE_ARGS = {
    "models": [
        {
            # Engines batch 2 requests at a time: a step of concurrent requests queues in the engine,
            # and only the engine signal (not the ongoing requests, far below their target) sees it.
            "name": "as-burst",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": {"kind": "cpu", "cpus": 0.1},
            "engine_args": {"max_num_seqs": 2, "num_threads": 1},
            "stream_interval_ms": 0,
            "stream_chunks_per_s": 0,
            "replicas": {
                "min": 1, "max": 2, "target_ongoing_requests": 32, "max_ongoing_requests": 64,
                "target_waiting_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 2, "drain_timeout_s": 60,
            },
        },
        {
            "name": "as-zero",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": {"kind": "cpu", "cpus": 0.1},
            "engine_args": {"num_threads": 1},
            "replicas": {"min": 0, "max": 1, "target_waiting_requests": 4, "upscale_delay_s": 1, "downscale_delay_s": 2},
        },
    ],
    "gateway": {"cpus": 0.05},
}


def running(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


@pytest.fixture(scope="module")
def autoscale_app(serve_url):
    # serve_url: Serve runs with the session's HTTP options; this app itself takes no HTTP route.
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(AUTOSCALE_ARGS), name=APP, route_prefix=None)
    yield
    serve.delete(APP)


async def _generate(handle, max_tokens: int) -> dict:
    """One streamed generation through the handle; returns the last delta."""
    last = None
    async for delta in handle.options(stream=True).stream.remote(messages=QUESTION, max_tokens=max_tokens, ignore_eos=True, temperature=0):
        last = delta
    return last


def test_min_zero_starts_from_zero_on_first_request(autoscale_app):
    from ray import serve

    assert running(ZERO) == 0
    start = time.monotonic()
    result = serve.get_deployment_handle(ZERO, app_name=APP).complete.remote(messages=QUESTION, max_tokens=8).result(timeout_s=120)
    assert result["usage"]["completion_tokens"] > 0
    assert running(ZERO) == 1
    print(f"cold start served in {time.monotonic() - start:.1f}s")


def test_scales_up_under_step_load_and_back_down_without_failures(autoscale_app):
    from ray import serve

    handle = serve.get_deployment_handle(BURST, app_name=APP)
    assert running(BURST) == 1
    first_replica = handle.complete.remote(messages=QUESTION, max_tokens=2).result(timeout_s=60)["replica"]

    async def scenario():
        results, errors = [], []
        step = asyncio.Event()  # set: the step load ends
        trickle = asyncio.Event()  # set: the light load ends too

        async def client(stop: asyncio.Event):
            while not stop.is_set():
                try:
                    last = await _generate(handle, 32)
                    assert last["finish_reason"] == "length" and last["completion_tokens"] == 32
                    results.append(last)
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(e)

        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(client(step)) for _ in range(9)] + [asyncio.create_task(client(trickle)) for _ in range(2)]
        # Step load: up to 2 replicas, and a request served by the new one.
        served_by = set()
        deadline = loop.time() + 90
        while loop.time() < deadline and not served_by - {first_replica}:
            await asyncio.sleep(1)
            if running(BURST) == 2:
                served_by.add((await handle.complete.remote(messages=QUESTION, max_tokens=2))["replica"])
        scaled_up = running(BURST)
        step.set()
        # Light load (two streams always in flight, no engine queue): back to one replica; the
        # replica removed drains its streams.
        deadline = loop.time() + 60
        while loop.time() < deadline and running(BURST) > 1:
            await asyncio.sleep(0.5)
        scaled_down = running(BURST)
        trickle.set()
        await asyncio.gather(*tasks)
        return scaled_up, served_by, scaled_down, results, errors

    scaled_up, served_by, scaled_down, results, errors = asyncio.run(scenario())
    assert scaled_up == 2, "the engine queue signal did not add a replica"
    assert served_by - {first_replica}, "no request was served by the new replica"
    assert scaled_down == 1, "did not scale back down after the load stopped"
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[0]!r}"
    assert len(results) > 10


def test_min_zero_scales_back_to_zero_when_idle(autoscale_app):
    wait_for(lambda: running(ZERO) == 0, 60, "the min-0 deployment to scale back to zero")
