"""Placement, without Ray: accelerator specs -> Serve replica options (checked against Ray Serve's
own ReplicaConfig rules), the config-time placement checks, and `cluster plan`'s packing core."""

from __future__ import annotations

import io

import pytest
from ray.serve._private.config import ReplicaConfig

from cluster.config import AcceleratorSpec, ReplicaSpec
from cluster.resolve import parse_args
from cluster.plan import config_requirements, run_plan
from placement.plan import (
    EXIT_INVALID,
    EXIT_OK,
    Requirement,
    format_report,
    label_selector_matches,
    plan_placement,
    requirement_from_options,
)
from placement.resources import placement_problems, replica_options


def _serve_accepts(options: dict) -> ReplicaConfig:
    """Ray Serve's own validation of deployment options (what `.options(...)` does at deploy time)."""
    options = dict(options)
    return ReplicaConfig.create(
        lambda: None,
        ray_actor_options=dict(options.pop("ray_actor_options")),
        placement_group_bundles=options.pop("placement_group_bundles", None),
        placement_group_strategy=options.pop("placement_group_strategy", None),
        placement_group_bundle_label_selector=options.pop("placement_group_bundle_label_selector", None),
        max_replicas_per_node=options.pop("max_replicas_per_node", None),
    )


# -- replica_options ------------------------------------------------------------------------------


def test_cpu_replica_asks_for_cpus_only():
    assert replica_options(AcceleratorSpec(cpus=0.5)) == {"ray_actor_options": {"num_cpus": 0.5}}


def test_single_gpu_with_type_labels_and_per_node_limit():
    acc = AcceleratorSpec(kind="gpu", type="H100", cpus=4, labels={"zone": "us-east1-a", "tandem/pool": "!spot"})
    opts = replica_options(acc, max_replicas_per_node=2)
    assert opts == {
        "ray_actor_options": {
            "num_cpus": 4, "num_gpus": 1, "accelerator_type": "H100",
            "label_selector": {"zone": "us-east1-a", "tandem/pool": "!spot"},
        },
        "max_replicas_per_node": 2,
    }
    cfg = _serve_accepts(opts)
    assert cfg.resource_dict == {"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001}


def test_single_npu_uses_the_npu_resource():
    opts = replica_options(AcceleratorSpec(kind="npu", type="Ascend910B", cpus=2))
    assert opts["ray_actor_options"] == {"num_cpus": 2, "resources": {"NPU": 1}, "accelerator_type": "Ascend910B"}
    _serve_accepts(opts)


def test_tensor_parallel_bundles_carry_type_and_labels_on_one_node():
    acc = AcceleratorSpec(kind="npu", count=4, type="Ascend910B", cpus=2, labels={"tandem/accelerator": "Ascend910B"})
    opts = replica_options(acc)
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    # Bundle 0 holds the replica actor: its CPUs, its first NPU and its accelerator type.
    assert opts["placement_group_bundles"] == [
        {"CPU": 2, "NPU": 1, "accelerator_type:Ascend910B": 0.001}, {"NPU": 1}, {"NPU": 1}, {"NPU": 1},
    ]
    # The labels steer the placement group (an actor label_selector would not).
    assert opts["placement_group_bundle_label_selector"] == [{"tandem/accelerator": "Ascend910B"}] * 4
    assert "label_selector" not in opts["ray_actor_options"]
    assert opts["ray_actor_options"] == {"num_cpus": 2, "resources": {"NPU": 1}, "accelerator_type": "Ascend910B"}
    _serve_accepts(opts)


def test_tensor_parallel_gpu_without_type_or_labels():
    opts = replica_options(AcceleratorSpec(kind="gpu", count=2, cpus=1))
    assert opts == {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1},
        "placement_group_bundles": [{"CPU": 1, "GPU": 1}, {"GPU": 1}],
        "placement_group_strategy": "STRICT_PACK",
    }
    _serve_accepts(opts)


def test_serve_itself_rejects_per_node_limit_with_bundles_so_we_refuse_it_first():
    acc = AcceleratorSpec(kind="gpu", count=2)
    with pytest.raises(ValueError, match="max_replicas_per_node is not allowed when placement_group_bundles"):
        _serve_accepts({**replica_options(acc), "max_replicas_per_node": 1})
    with pytest.raises(ValueError, match=r"max_replicas_per_node \(1\) is not allowed with accelerator count 2"):
        replica_options(acc, max_replicas_per_node=1)


# -- placement_problems (config-time checks) --------------------------------------------------------


def test_placement_problems_names_the_field():
    acc = AcceleratorSpec(kind="gpu", count=2, type="H100")
    (msg,) = placement_problems(acc, ReplicaSpec(max_replicas_per_node=1), "models[0].accelerator", "models[0].replicas")
    assert msg.startswith("models[0].replicas.max_replicas_per_node: not allowed with models[0].accelerator.count 2")
    assert "remove max_replicas_per_node (got 1)" in msg
    assert placement_problems(acc, ReplicaSpec()) == []
    assert placement_problems(AcceleratorSpec(kind="gpu"), ReplicaSpec(max_replicas_per_node=1)) == []
    assert placement_problems(AcceleratorSpec(kind="cpu"), ReplicaSpec(max_replicas_per_node=2)) == []


def test_placement_problems_rejects_bad_label_selectors_and_huge_per_node_limits():
    bad = AcceleratorSpec(kind="gpu", labels={"zone": "us east", "-bad-key": "x", "ok": "in(a,b)", "ok2": "!spot"})
    problems = placement_problems(bad, ReplicaSpec(max_replicas_per_node=101), "m.accelerator", "m.replicas")
    assert len(problems) == 3
    assert problems[0].startswith("m.accelerator.labels: 'zone': 'us east' is not a Ray label selector")
    assert problems[1].startswith("m.accelerator.labels: '-bad-key': 'x' is not a Ray label selector")
    assert problems[2] == "m.replicas.max_replicas_per_node: Ray Serve allows at most 100 (got 101)"


# -- label selectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector, labels, expected",
    [
        ({}, {}, True),
        ({"a": "x"}, {"a": "x"}, True),
        ({"a": "x"}, {"a": "y"}, False),
        ({"a": "x"}, {}, False),
        ({"a": "!x"}, {"a": "y"}, True),
        ({"a": "!x"}, {}, True),
        ({"a": "!x"}, {"a": "x"}, False),
        ({"a": "in(x, y)"}, {"a": "y"}, True),
        ({"a": "in(x,y)"}, {"a": "z"}, False),
        ({"a": "!in(x,y)"}, {"a": "z"}, True),
        ({"a": "x", "b": "y"}, {"a": "x", "b": "z"}, False),
    ],
)
def test_label_selector_semantics(selector, labels, expected):
    assert label_selector_matches(selector, labels) is expected


# -- plan_placement -------------------------------------------------------------------------------


def _node(node_id, resources, labels=None, available=None, reclaimable=None, alive=True, ip="10.0.0.1"):
    d = {"NodeID": node_id * 8, "NodeManagerAddress": ip, "Alive": alive, "Resources": resources, "Labels": labels or {}}
    if available is not None:
        d["Available"] = available
    if reclaimable is not None:
        d["Reclaimable"] = reclaimable
    return d


HEAD = _node("h", {"CPU": 8, "node:__internal_head__": 1, "memory": 1e10})
GPU = _node("g", {"CPU": 2, "GPU": 4, "accelerator_type:H100": 1}, {"tandem/accelerator": "H100"})
NPU = _node("n", {"CPU": 2, "NPU": 8, "accelerator_type:Ascend910B": 1}, {"tandem/accelerator": "Ascend910B"})


def _req(name, acc, min_replicas=1, max_replicas=None, per_node=None):
    return requirement_from_options(name, name, replica_options(acc, per_node), min_replicas, max_replicas or min_replicas)


def test_requirement_from_options_plain_and_tensor_parallel():
    r = _req("a", AcceleratorSpec(kind="gpu", type="H100", cpus=2, labels={"z": "1"}), 2, 4, per_node=1)
    assert r.bundles == ({"CPU": 2, "GPU": 1, "accelerator_type:H100": 0.001},)
    assert (r.labels, r.min_replicas, r.max_replicas, r.max_replicas_per_node, r.strategy) == ({"z": "1"}, 2, 4, 1, None)
    tp = _req("b", AcceleratorSpec(kind="gpu", count=2, type="H100", labels={"z": "1"}))
    assert tp.per_replica == {"CPU": 1, "GPU": 2, "accelerator_type:H100": 0.001}
    assert (tp.labels, tp.strategy, tp.accelerator_type) == ({"z": "1"}, "STRICT_PACK", "H100")


def test_every_kind_lands_on_its_own_node():
    reqs = [
        _req("BaseModel-gpu", AcceleratorSpec(kind="gpu", count=2, type="H100")),
        _req("BaseModel-npu", AcceleratorSpec(kind="npu", type="Ascend910B", labels={"tandem/accelerator": "Ascend910B"}), 2),
        _req("Gateway", AcceleratorSpec(cpus=0.25)),
    ]
    report = plan_placement(reqs, [HEAD, GPU, NPU])
    assert report.placeable, report.problems
    gpu, npu, gw = report.placements
    assert [n.short for n in gpu.capable] == ["gggggggg"] and gpu.placed == {"g" * 8: 1}
    assert [n.short for n in npu.capable] == ["nnnnnnnn"] and npu.placed == {"n" * 8: 2}
    # CPU-only replicas are kept off accelerator nodes when a plain node has room.
    assert len(gw.capable) == 3 and gw.placed == {"h" * 8: 1}
    text = format_report(report, "1.2.3.4:6379")
    assert "placement: every deployment's min replicas fit" in text
    assert "2 x GPU H100 on one node (STRICT_PACK)" in text


def test_too_many_devices_for_any_node_says_which_nodes_have_them():
    report = plan_placement([_req("BaseModel-x", AcceleratorSpec(kind="gpu", count=16, type="H100"))], [HEAD, GPU, NPU])
    (problem,) = report.problems
    assert problem.startswith("BaseModel-x: needs 1 CPU, 16 x GPU H100 on one node (STRICT_PACK); ")
    assert "no node has 16 GPU with accelerator type H100 on one node" in problem
    assert "nodes with GPU: gggggggg: 4 GPU, type H100, labels {tandem/accelerator=H100}" in problem
    assert "CANNOT PLACE:" in format_report(report)


def test_wrong_accelerator_type_and_missing_labels_and_missing_device():
    a100 = plan_placement([_req("BaseModel-a", AcceleratorSpec(kind="gpu", type="A100"))], [HEAD, GPU]).problems[0]
    assert "no node has 1 GPU with accelerator type A100" in a100 and "type H100" in a100
    lab = plan_placement([_req("BaseModel-l", AcceleratorSpec(kind="gpu", labels={"zone": "b"}))], [HEAD, GPU]).problems[0]
    assert "no alive node has labels matching {zone=b}" in lab and "gggggggg: {tandem/accelerator=H100}" in lab
    npu = plan_placement([_req("BaseModel-n", AcceleratorSpec(kind="npu"))], [HEAD, GPU]).problems[0]
    assert "no node has 1 NPU" in npu and "no node has any NPU" in npu


def test_dead_nodes_do_not_count():
    dead = _node("d", {"CPU": 2, "GPU": 8}, alive=False)
    report = plan_placement([_req("BaseModel-x", AcceleratorSpec(kind="gpu", count=8))], [HEAD, dead])
    assert "no node has any GPU" in report.problems[0]


def test_min_replicas_pack_across_deployments_using_free_resources():
    busy_gpu = _node("g", {"CPU": 2, "GPU": 4}, available={"CPU": 2, "GPU": 1}, reclaimable={"GPU": 2})
    # 3 GPUs free (1 available + 2 held by this app's own replicas): one TP-2 replica fits, not two.
    report = plan_placement([_req("BaseModel-tp", AcceleratorSpec(kind="gpu", count=2), 2)], [HEAD, busy_gpu])
    (p,) = report.placements
    assert p.placed_count == 1 and [n.short for n in p.free_now] == ["gggggggg"]
    assert "only 1 of min 2 replicas fit" in report.problems[0] and "gggggggg left {CPU: 1, GPU: 1}" in report.problems[0]
    # Two deployments competing for the same 4 GPUs.
    reqs = [_req("A", AcceleratorSpec(kind="gpu", count=2)), _req("B", AcceleratorSpec(kind="gpu"), 3)]
    report = plan_placement(reqs, [HEAD, _node("g", {"CPU": 4, "GPU": 4})])
    assert [p.placed_count for p in report.placements] == [1, 2]
    assert report.problems == [report.placements[1].problem] and "only 2 of min 3" in report.problems[0]


def test_max_replicas_per_node_limits_packing():
    reqs = [_req("BaseModel-s", AcceleratorSpec(kind="gpu", type="H100"), 2, per_node=1)]
    (problem,) = plan_placement(reqs, [HEAD, GPU]).problems
    assert "max_replicas_per_node 1 allows at most 1 on the 1 node(s) that can host one: gggggggg" in problem
    gpu2 = _node("k", {"CPU": 2, "GPU": 4, "accelerator_type:H100": 1})
    report = plan_placement(reqs, [HEAD, GPU, gpu2])
    assert report.placeable and report.placements[0].placed == {"g" * 8: 1, "k" * 8: 1}


def test_zero_min_replicas_is_never_a_problem():
    assert plan_placement([_req("BaseModel-z", AcceleratorSpec(kind="gpu", count=64), 0, 2)], [HEAD]).placeable


# -- from a config --------------------------------------------------------------------------------


def test_config_requirements_cover_pools_agents_and_gateway():
    cfg = parse_args({
        "models": [
            {"name": "m", "source": "builtin:tiny-chat", "pools": [
                {"name": "cpu", "engine": "transformers", "accelerator": {"kind": "cpu", "cpus": 0.5}, "replicas": {"min": 2, "max": 3}},
                {"name": "gpu", "engine": "transformers", "accelerator": {"kind": "gpu", "type": "H100", "labels": {"z": "a"}}},
            ]},
        ],
        "agents": [{"name": "a", "program": "deployments.programs:safe_response", "model": "m", "cpus": 0.05}],
        "gateway": {"cpus": 0.1, "replicas": 2},
    })
    reqs = config_requirements(cfg, "tandem")
    assert [(r.deployment, r.what, r.min_replicas, r.max_replicas) for r in reqs] == [
        ("BaseModel-m-cpu", "model m, pool cpu", 2, 3),
        ("BaseModel-m-gpu", "model m, pool gpu", 1, 1),
        ("Agent-a", "agent a", 1, 1),
        ("Gateway", "gateway", 2, 2),
    ]
    assert reqs[1].bundles == ({"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001},) and reqs[1].labels == {"z": "a"}
    assert reqs[2].bundles == ({"CPU": 0.05},) and reqs[3].bundles == ({"CPU": 0.1},)


def test_plan_without_a_cluster_prints_requirements_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    out = io.StringIO()
    assert run_plan("cluster.yaml", out=out) == EXIT_OK
    text = out.getvalue()
    assert "BaseModel-tiny-chat (model tiny-chat)" in text and "Gateway (gateway)" in text
    assert "no Ray cluster reachable at 127.0.0.1:1" in text and "requirements only" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: t, import_path: cluster.app:build_app, args: {models: []}}]\n")
    assert run_plan(str(bad), out=io.StringIO()) == EXIT_INVALID


def test_plan_never_starts_a_cluster_for_ray_client_addresses():
    out = io.StringIO()
    assert run_plan("cluster.yaml", address="ray://127.0.0.1:10001", out=out) == EXIT_OK
    assert "is a Ray Client address" in out.getvalue()


def test_requirement_dataclass_sums_bundles():
    r = Requirement("d", "x", ({"CPU": 1, "GPU": 1}, {"GPU": 1}), strategy="STRICT_PACK")
    assert r.per_replica == {"CPU": 1, "GPU": 2}
