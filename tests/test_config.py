"""Config validation: every bad field is named with its value and what is allowed, before Ray starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoscale.policy import deployment_scaling_options
from cluster.app import model_deployment_options
from cluster.config import ConfigError, parse_args
from placement.resources import replica_options

ROOT = Path(__file__).resolve().parent.parent


def _model(**overrides):
    return {"models": [{"name": "m", "source": "builtin:tiny-chat", **overrides}]}


def _problems(args) -> str:
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    return str(e.value)


def test_default_cluster_yaml_is_valid():
    out = subprocess.run([sys.executable, "-m", "cluster", "check", "cluster.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BaseModel-tiny-chat" in out.stdout and "engine transformers" in out.stdout


def test_unknown_key_is_rejected_with_its_path():
    msg = _problems(_model(colour="blue"))
    assert "models[0].colour: unknown field (value 'blue')" in msg


def test_bad_enum_names_allowed_values():
    msg = _problems(_model(accelerator={"kind": "tpu"}))
    assert "models[0].accelerator.kind" in msg and "'cpu', 'gpu' or 'npu'" in msg and "'tpu'" in msg


def test_replica_bounds_and_duplicate_names():
    assert "min (3) must be <= max (2)" in _problems(_model(replicas={"min": 3, "max": 2}))
    args = {"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}
    assert "model names must be unique; repeated: a" in _problems(args)


def test_engine_not_in_this_version_is_a_config_error():
    msg = _problems(_model(engine="turbomind", accelerator={"kind": "gpu"}))
    assert "models[0].engine: 'turbomind' is not available" in msg and "allowed: transformers" in msg
    msg = _problems(_model(accelerator={"kind": "gpu", "count": 2}))
    assert "'auto' (resolves to 'turbomind'" in msg


def test_missing_models_and_agent_prefix():
    assert "models: required field is missing" in _problems({})
    assert "may not start with 'agent:'" in _problems({"models": [{"name": "agent:x", "source": "s"}]})


def test_check_cli_reports_every_problem_and_fails(tmp_path):
    bad = {
        "applications": [
            {
                "name": "tandem",
                "import_path": "cluster.app:build_app",
                "args": _model(accelerator={"kind": "cpu", "cpus": -1}, replicas={"min": 0, "max": 0}),
            }
        ]
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "cluster", "check", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert "applications[0].args.models[0].accelerator.cpus: Input should be greater than 0 (got -1)" in out.stderr
    assert "applications[0].args.models[0].replicas.max: Input should be greater than 0 (got 0)" in out.stderr


def test_check_cli_rejects_non_serve_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("models: []\n")
    out = subprocess.run([sys.executable, "-m", "cluster", "check", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "expected a Ray Serve config with an 'applications' list" in out.stderr


def test_placement_cpu_gpu_npu_and_tensor_parallel_bundles():
    cfg = parse_args(_model(accelerator={"kind": "cpu", "cpus": 0.5}))
    assert replica_options(cfg.models[0].accelerator) == {"ray_actor_options": {"num_cpus": 0.5}}

    from cluster.config import AcceleratorSpec

    gpu = replica_options(AcceleratorSpec(kind="gpu", count=1, type="H100", cpus=4))
    assert gpu == {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "H100"}}
    tp = replica_options(AcceleratorSpec(kind="npu", count=4, type="Ascend910B", cpus=2))
    assert tp["placement_group_strategy"] == "STRICT_PACK"
    assert tp["placement_group_bundles"] == [{"CPU": 2, "NPU": 1}, {"NPU": 1}, {"NPU": 1}, {"NPU": 1}]
    assert tp["ray_actor_options"]["resources"] == {"NPU": 1}


def test_autoscaling_options_fixed_and_ranged():
    cfg = parse_args(_model(replicas={"min": 2, "max": 2}))
    assert deployment_scaling_options(cfg.models[0].replicas)["num_replicas"] == 2
    cfg = parse_args(_model(replicas={"min": 0, "max": 4, "target_ongoing_requests": 4}, runtime_env={"env_vars": {"A": "1"}}))
    opts = model_deployment_options(cfg.models[0])
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["ray_actor_options"]["runtime_env"] == {"env_vars": {"A": "1"}}
    assert opts["name"] == "BaseModel-m"
