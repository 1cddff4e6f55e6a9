"""Placement on a real multi-node Ray cluster (the session cluster: a CPU head, a "GPU" worker with
4 GPUs of type H100, an "NPU" worker with 8 Ascend910B NPUs; see conftest).

The accelerators are declared, not real: every replica here runs the CPU engine (transformers,
`builtin:tiny-chat`, tiny CPU fractions) as a stand-in for a GPU/NPU engine, while asking Ray for
exactly the resources, accelerator types, label selectors and TP placement-group bundles that
`placement.resources.replica_options` gives a real accelerator replica.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import yaml

from cluster.config import AcceleratorSpec
from placement.plan import EXIT_UNPLACEABLE, cluster_nodes, plan_placement, requirement_from_options
from placement.resources import replica_options
from tests.conftest import GPU_NODE, ROOT

DEPLOYMENT = "BaseModel-mn"
ENGINE_ARGS = {"num_threads": 1, "max_num_seqs": 4}
STARTUP_TIMEOUT_S = 150


# -- helpers ----------------------------------------------------------------------------------------


def _model_app(acc: AcceleratorSpec, replicas: int = 1, per_node: int | None = None):
    """The real base-model deployment with the replica options an accelerator replica would get."""
    from deployments.base_model import BaseModelDeployment

    return BaseModelDeployment.options(
        name=DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=8,
        health_check_period_s=1,
        graceful_shutdown_timeout_s=1,
        **replica_options(acc, per_node),
    ).bind("tiny-chat", "builtin:tiny-chat", "transformers", ENGINE_ARGS)


def _deploy(apps: dict) -> None:
    """Start applications without waiting (one controller pass starts their replicas together)."""
    from ray import serve
    from ray.serve.api import RunTarget

    serve.run_many(
        [RunTarget(target=app, name=name, route_prefix=None) for name, app in apps.items()],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def _status(app: str):
    from ray import serve

    status = serve.status().applications.get(app)
    return status.deployments.get(DEPLOYMENT) if status else None


def _wait_for(predicate, timeout_s: float, what) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what() if callable(what) else what}")


def _wait_running(apps, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    from ray import serve

    def all_running():
        status = serve.status().applications
        return all(a in status and status[a].status == "RUNNING" for a in apps)

    def describe():
        status = serve.status().applications
        return {a: (status[a].status, status[a].message or status[a].deployments.get(DEPLOYMENT)) for a in apps if a in status}

    _wait_for(all_running, timeout_s, lambda: f"applications running: {describe()}")


def replica_nodes(app: str) -> list[str]:
    """Node ids of the app's alive replica actors (from the GCS actor table)."""
    import ray._private.state as state

    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT}#"
    actors = state.actors(actor_state_name="ALIVE").values()
    return sorted(a["Address"]["NodeID"] for a in actors if a["Name"].startswith(prefix))


def _complete(app: str, timeout_s: float = 60) -> dict:
    from ray import serve

    handle = serve.get_app_handle(app)
    return handle.complete.remote(prompt="The capital of France is", max_tokens=2, temperature=0).result(timeout_s=timeout_s)


def _delete(*apps: str) -> None:
    from ray import serve

    for app in apps:
        serve.delete(app)


# -- where tagged replicas land -----------------------------------------------------------------------

PLACED = {
    # A GPU replica with an accelerator type: only the GPU node has GPUs of type H100.
    "mn-gpu": AcceleratorSpec(kind="gpu", type="H100", cpus=0.05),
    # An NPU replica, selecting its node by label as well.
    "mn-npu": AcceleratorSpec(kind="npu", type="Ascend910B", cpus=0.05, labels={"tandem/kind": "npu"}),
    # A CPU replica pinned by label selectors alone: `in(...)` and `!` operators; the head has no label.
    "mn-label": AcceleratorSpec(cpus=0.05, labels={"tandem/accelerator": "in(H100,A100)", "tandem/kind": "!npu"}),
    # Tensor parallelism 2: a placement group of 2 GPU bundles, STRICT_PACK onto one node.
    "mn-tp2": AcceleratorSpec(kind="gpu", count=2, type="H100", cpus=0.05, labels={"tandem/kind": "gpu"}),
}


@pytest.fixture(scope="module")
def placed(multinode, serve_url):
    started = time.monotonic()
    _deploy({name: _model_app(acc) for name, acc in PLACED.items()})
    _wait_running(PLACED)
    print(f"\n{len(PLACED)} tagged apps up in {time.monotonic() - started:.1f}s")
    yield multinode
    _delete(*PLACED)


def test_gpu_npu_and_label_tagged_replicas_land_only_on_matching_nodes(placed):
    """CPU-engine stand-ins for GPU / NPU replicas: each lands on the node its resources, accelerator
    type and label selector allow, and serves requests there."""
    gpu, npu = placed.gpu.node_id, placed.npu.node_id
    assert replica_nodes("mn-gpu") == [gpu]
    assert replica_nodes("mn-npu") == [npu]
    assert replica_nodes("mn-label") == [gpu]
    for app in ("mn-gpu", "mn-npu", "mn-label"):
        assert _complete(app)["usage"]["completion_tokens"] >= 1


def test_tensor_parallel_bundles_sit_on_one_node(placed):
    """A TP=2 stand-in replica: its placement group's bundles (2 GPUs, type H100 in bundle 0) are all
    on the GPU node, STRICT_PACK, and the replica actor runs in them."""
    import ray

    groups = [pg for pg in ray.util.placement_group_table().values()
              if pg["name"].startswith(f"SERVE_REPLICA::mn-tp2#{DEPLOYMENT}#") and pg["state"] == "CREATED"]
    assert len(groups) == 1, groups
    (pg,) = groups
    assert pg["strategy"] == "STRICT_PACK"
    assert set(pg["bundles_to_node_id"].values()) == {placed.gpu.node_id}
    assert pg["bundles"][0] == {"CPU": 0.05, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert pg["bundles"][1] == {"GPU": 1.0}
    assert replica_nodes("mn-tp2") == [placed.gpu.node_id]
    assert _complete("mn-tp2")["usage"]["completion_tokens"] >= 1


def test_plan_counts_what_running_replicas_hold_as_reclaimable(placed):
    """`plan` packs a redeploy into free + what the application's own replicas (and their placement
    groups) hold: read from the live cluster for the running stand-in replicas."""
    nodes = {n["NodeID"]: n for n in cluster_nodes(["mn-gpu", "mn-tp2"])}
    held = nodes[placed.gpu.node_id]["Reclaimable"]
    assert held["GPU"] == pytest.approx(3) and held["CPU"] == pytest.approx(0.1)
    assert held["accelerator_type:H100"] == pytest.approx(0.002)
    assert nodes[placed.npu.node_id]["Reclaimable"] == {}
    # The same 3 GPUs again fit only because they are reclaimable: 1 GPU of 4 is left otherwise.
    reqs = [requirement_from_options("tp2", "x", replica_options(PLACED["mn-tp2"]), 1, 1),
            requirement_from_options("gpu", "y", replica_options(PLACED["mn-gpu"]), 1, 1)]
    assert plan_placement(reqs, nodes.values()).placeable
    assert not plan_placement(reqs, [{**n, "Reclaimable": {}} for n in nodes.values()]).placeable


# -- what cannot be placed ------------------------------------------------------------------------


def test_unplaceable_replica_is_reported_by_plan_and_by_serve_status(multinode, serve_url, tmp_path):
    """A TP=16 stand-in replica (16 x H100 on one node) cannot be placed: `plan` against the running
    cluster says why and exits 2, and Serve's deployment status names the resources it waits for."""
    acc = AcceleratorSpec(kind="gpu", count=16, type="H100", cpus=0.05)
    # The plan core, over the live nodes.
    req = requirement_from_options(DEPLOYMENT, "model x", replica_options(acc), 1, 1)
    report = plan_placement([req], cluster_nodes())
    (problem,) = report.problems
    assert "needs 0.05 CPU, 16 x GPU H100 on one node (STRICT_PACK)" in problem
    assert "no node has 16 GPU with accelerator type H100 on one node" in problem
    assert f"nodes with GPU: {multinode.gpu.node_id[:8]}: 4 GPU, type H100" in problem

    # The CLI, on a config file, against the running cluster (a separate process that connects).
    pools = [
        {"name": "h100", "engine": "transformers", "accelerator": {"kind": "gpu", "type": "H100", "cpus": 0.05}},
        {"name": "a100", "engine": "transformers", "accelerator": {"kind": "gpu", "type": "A100", "cpus": 0.05}},
    ]
    config = {"applications": [{"name": "mn-plan", "route_prefix": None, "import_path": "cluster.app:build_app",
                                "args": {"models": [{"name": "m", "source": "builtin:tiny-chat", "pools": pools}]}}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "cluster", "plan", str(path), "--address", multinode.address],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == EXIT_UNPLACEABLE, out.stdout + out.stderr
    assert f"cluster at {multinode.address}: 3 alive node(s)" in out.stdout
    assert "BaseModel-m-a100: needs 0.05 CPU, 1 x GPU A100; no node has 1 GPU with accelerator type A100" in out.stdout
    assert "BaseModel-m-h100 (model m, pool h100)" in out.stdout and "min replicas: 1 of 1 fit" in out.stdout
    h100_block = out.stdout.split("BaseModel-m-h100 (model m, pool h100)")[1].split("BaseModel-m-a100")[0]
    assert multinode.gpu.node_id[:8] in h100_block and multinode.npu.node_id[:8] not in h100_block

    # Serve: the replica waits for resources, and the deployment status says which ones.
    _deploy({"mn-unplaceable": _model_app(acc)})
    try:
        _wait_for(lambda: "to be scheduled" in getattr(_status("mn-unplaceable"), "message", ""), 45,
                  lambda: f"a scheduling message, status: {_status('mn-unplaceable')}")
        status = _status("mn-unplaceable")
        assert status.status == "UPDATING" and status.replica_states.get("RUNNING", 0) == 0
        assert "Resources required for each replica" in status.message
        assert status.message.count('"GPU": 1') == 16 and '"accelerator_type:H100": 0.001' in status.message
        assert replica_nodes("mn-unplaceable") == []
    finally:
        _delete("mn-unplaceable")


# -- losing a node ----------------------------------------------------------------------------------

RETRYABLE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "ReplicaUnavailableError",
             "DeploymentUnavailableError", "BackPressureError")


def test_node_loss_moves_replicas_and_requests_keep_succeeding(multinode, serve_url):
    """Two GPU-pinned stand-in replicas, at most one per node, one of them on an extra GPU node. The
    extra node dies while requests flow through a handle: the lost replica moves to a spare GPU node,
    requests succeed throughout or fail only with a retryable actor/replica error, then all succeed."""
    from ray import serve

    gpu_node = {**GPU_NODE, "num_cpus": 1}
    extra = multinode.add_node(**gpu_node)
    spare = None
    app = "mn-failover"
    try:
        acc = AcceleratorSpec(kind="gpu", type="H100", cpus=0.05, labels={"tandem/kind": "gpu"})
        _deploy({app: _model_app(acc, replicas=2, per_node=1)})
        _wait_running([app])
        assert replica_nodes(app) == sorted([multinode.gpu.node_id, extra.node_id])
        # A spare GPU node, free now that both replicas are placed: where the lost replica can go.
        spare = multinode.add_node(**gpu_node)

        handle = serve.get_app_handle(app)
        outcomes: list[tuple[float, str]] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    handle.complete.remote(prompt="Hello", max_tokens=2, temperature=0).result(timeout_s=60)
                    outcomes.append((time.monotonic(), "ok"))
                    time.sleep(0.05)  # a steady trickle, not a flood, on a small shared machine
                except Exception as e:  # noqa: BLE001 - every outcome is counted and checked below
                    outcomes.append((time.monotonic(), type(e).__name__))
                    time.sleep(0.2)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: len(outcomes) >= 4, 60, "requests before the node loss")
        lost_at = time.monotonic()
        multinode.cluster.remove_node(extra, allow_graceful=False)
        extra = None
        _wait_for(
            lambda: replica_nodes(app) == sorted([multinode.gpu.node_id, spare.node_id]) and _status(app).status == "HEALTHY",
            STARTUP_TIMEOUT_S, lambda: f"the lost replica on the spare node: {_status(app)}",
        )
        moved_at = time.monotonic()
        _wait_for(lambda: sum(1 for t, o in outcomes if t > moved_at and o == "ok") >= 6, 60, "requests after the move")
        stop.set()
        for t in threads:
            t.join(timeout=90)

        counts = Counter(o for _, o in outcomes)
        failures = {o: n for o, n in counts.items() if o != "ok"}
        print(f"\nnode loss: {dict(counts)}; replica moved in {moved_at - lost_at:.1f}s")
        assert set(failures) <= set(RETRYABLE), f"non-retryable failures: {failures}"
        assert counts["ok"] >= 10 and sum(failures.values()) <= 8, counts
        # Every request after the replica moved succeeded.
        assert all(o == "ok" for t, o in outcomes if t > moved_at + 1)
        # During the loss, the surviving replica kept serving.
        assert any(o == "ok" for t, o in outcomes if lost_at < t < moved_at)
    finally:
        _delete(app)
        for node in (extra, spare):
            if node is not None:
                multinode.cluster.remove_node(node)
