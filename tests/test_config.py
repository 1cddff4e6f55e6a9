"""Config validation: every bad field is named with its value and what is allowed, before Ray starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoscale.policy import deployment_scaling_options
from cluster.app import SERVE_FAST_PATH_ENV, agent_deployment_options, model_deployment_options
from cluster.config import ConfigError
from cluster.resolve import agent_own_model, model_pools, parse_args
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


def test_output_parsers_are_checked_against_the_known_names():
    msg = _problems(_model(tool_call_parser="qwen7", reasoning_parser="r1"))
    assert ("models[0].tool_call_parser: unknown parser 'qwen7'; allowed: deepseekv3, hermes, intern-s1, internlm, "
            "interns1, llama3, qwen, qwen25, qwen2d5, qwen3, auto (from the chat template) or null") in msg
    assert "models[0].reasoning_parser: unknown parser 'r1'; allowed: deepseek-r1, qwen3, qwen3-thinking or null" in msg
    parse_args(_model(tool_call_parser=None, reasoning_parser="deepseek-r1"))  # both valid


def test_replica_bounds_and_duplicate_names():
    assert "min (3) must be <= max (2)" in _problems(_model(replicas={"min": 3, "max": 2}))
    args = {"models": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}
    assert "model names must be unique; repeated: a" in _problems(args)


def test_impossible_engine_accelerator_pairs_name_the_field():
    msg = _problems(_model(engine="turbomind", accelerator={"kind": "cpu"}))
    assert "models[0].engine: 'turbomind' runs on gpu, not on accelerator kind 'cpu'" in msg
    assert "engines for 'cpu': transformers" in msg
    assert "not on accelerator kind 'npu'" in _problems(_model(engine="turbomind", accelerator={"kind": "npu"}))
    assert "'sglang' runs on gpu, not on accelerator kind 'cpu'" in _problems(_model(engine="sglang"))
    assert "'lmdeploy-pytorch' runs on npu" in _problems(_model(engine="lmdeploy-pytorch", accelerator={"kind": "gpu"}))


def test_auto_engine_per_accelerator(tmp_path):
    (pool,) = model_pools(parse_args(_model()).models[0])
    assert (pool.engine, pool.auto) == ("transformers", True)
    # The built-in model is a Qwen2, which TurboMind supports.
    (pool,) = model_pools(parse_args(_model(accelerator={"kind": "gpu"})).models[0])
    assert pool.engine == "turbomind"
    (pool,) = model_pools(parse_args(_model(accelerator={"kind": "npu", "count": 2})).models[0])
    assert pool.engine == "lmdeploy-pytorch"
    # An architecture TurboMind does not know goes to SGLang.
    (tmp_path / "config.json").write_text('{"architectures": ["MambaForCausalLM"], "num_attention_heads": 8}')
    (pool,) = model_pools(parse_args(_model(source=str(tmp_path), accelerator={"kind": "gpu"})).models[0])
    assert pool.engine == "sglang"
    # An architecture that cannot be read here is a config error, not a guess.
    msg = _problems(_model(source="some-org/not-on-this-machine", accelerator={"kind": "gpu"}))
    assert "models[0].engine: 'auto' on a GPU picks TurboMind or SGLang by the model's architecture" in msg


def test_engine_args_are_checked_against_the_engines_own_config_classes():
    msg = _problems(_model(engine="turbomind", accelerator={"kind": "gpu"}, engine_args={"sesion_len": 4096}))
    assert "models[0]: engine 'turbomind':" in msg and "sesion_len" in msg
    msg = _problems(_model(engine="sglang", accelerator={"kind": "gpu"}, engine_args={"mem_fraction": 0.8}))
    assert "models[0]: engine 'sglang':" in msg and "mem_fraction" in msg
    assert "max_num_seqs" in _problems(_model(engine_args={"max_num_seqs": 0}))
    parse_args(_model(engine="turbomind", accelerator={"kind": "gpu", "count": 2},
                      engine_args={"model_format": "awq", "quant_policy": 8, "session_len": 4096}))
    parse_args(_model(engine="sglang", accelerator={"kind": "gpu"}, engine_args={"mem_fraction_static": 0.8}))


def test_tensor_parallel_size_must_suit_engine_and_model():
    # The built-in model has 2 attention heads: 4-way tensor parallelism cannot split them.
    msg = _problems(_model(engine="turbomind", accelerator={"kind": "gpu", "count": 4}))
    assert "models[0]: engine 'turbomind':" in msg and "4" in msg
    assert "models[0]: engine 'turbomind':" in _problems(_model(engine="turbomind", accelerator={"kind": "gpu", "count": 3}))
    assert "models[0]: engine 'sglang':" in _problems(_model(engine="sglang", accelerator={"kind": "gpu", "count": 4}))


def test_runtime_env_defaults_per_engine_and_overrides():
    (pool,) = model_pools(parse_args(_model(engine="turbomind", accelerator={"kind": "gpu"})).models[0])
    assert "lmdeploy==0.18.0" in pool.runtime_env["pip"]["packages"]
    (pool,) = model_pools(parse_args(_model(engine="sglang", accelerator={"kind": "gpu"})).models[0])
    assert "sglang[all]==0.5.23" in pool.runtime_env["pip"]["packages"]
    (pool,) = model_pools(parse_args(_model(engine="sglang", accelerator={"kind": "gpu"}, runtime_env={})).models[0])
    assert pool.runtime_env == {}
    prepared = {"py_executable": "/opt/venvs/sglang/bin/python"}
    (pool,) = model_pools(parse_args(_model(engine="sglang", accelerator={"kind": "gpu"}, runtime_env=prepared)).models[0])
    # Ray Serve's fast-path switches join every base-model runtime_env; the deployment's own env_vars win.
    assert model_deployment_options(pool)["ray_actor_options"]["runtime_env"] == {**prepared, "env_vars": SERVE_FAST_PATH_ENV}
    (pool,) = model_pools(parse_args(_model()).models[0])
    assert model_deployment_options(pool)["ray_actor_options"]["runtime_env"] == {"env_vars": SERVE_FAST_PATH_ENV}
    mine = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}}
    (pool,) = model_pools(parse_args(_model(runtime_env=mine)).models[0])
    env = model_deployment_options(pool)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def test_pools_are_validated_and_named():
    two = [
        {"name": "h100", "engine": "turbomind", "accelerator": {"kind": "gpu", "type": "H100"}},
        {"name": "ascend", "accelerator": {"kind": "npu"}, "replicas": {"min": 0, "max": 2}},
    ]
    (m,) = parse_args({"models": [{"name": "m", "source": "builtin:tiny-chat", "pools": two}]}).models
    pools = model_pools(m)
    assert [(p.deployment_name, p.engine) for p in pools] == [("BaseModel-m-h100", "turbomind"), ("BaseModel-m-ascend", "lmdeploy-pytorch")]
    msg = _problems({"models": [{"name": "m", "source": "s", "engine": "turbomind", "pools": two}]})
    assert "models[0]: with pools, set engine per pool, not on the model" in msg
    msg = _problems({"models": [{"name": "m", "source": "s", "pools": [two[0], two[0]]}]})
    assert "pool names must be unique within a model; repeated: h100" in msg
    msg = _problems({"models": [{"name": "m", "source": "builtin:tiny-chat", "pools": [{"name": "x", "engine": "sglang"}]}]})
    assert "models[0].pools[0].engine: 'sglang' runs on gpu" in msg


def test_agent_backend_is_a_model_or_its_own_engine():
    base = {"name": "a", "program": "deployments.programs:multi_step_reasoning"}
    msg = _problems({**_model(), "agents": [base]})
    assert "agents[0]: give exactly one of model" in msg
    own = {"source": "builtin:tiny-chat", "accelerator": {"kind": "gpu"}}
    cfg = parse_args({**_model(), "agents": [{**base, "own_model": own}]})
    assert agent_own_model(cfg.agents[0]).engine == "sglang"  # 'auto' for an agent's own GPU engine
    opts = agent_deployment_options(cfg.agents[0])
    assert opts["ray_actor_options"]["num_gpus"] == 1 and "sglang[all]==0.5.23" in opts["ray_actor_options"]["runtime_env"]["pip"]["packages"]
    msg = _problems({**_model(), "agents": [{**base, "own_model": {**own, "engine": "turbomind", "accelerator": {"kind": "cpu"}}}]})
    assert "agents[0].own_model.engine: 'turbomind' runs on gpu" in msg


def test_examples_pass_check():
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    assert {Path(p).name for p in examples} >= {"gpu.yaml", "ascend.yaml", "hybrid.yaml", "awq.yaml"}
    out = subprocess.run([sys.executable, "-m", "cluster", "check", *examples], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "engine turbomind; per replica: 4 CPU, 1 x GPU H100" in out.stdout
    assert "engine lmdeploy-pytorch; per replica: 8 CPU, 2 x NPU Ascend910B" in out.stdout
    assert "BaseModel-qwen2.5-7b-instruct-h100" in out.stdout and "BaseModel-qwen2.5-7b-instruct-ascend" in out.stdout
    assert "runtime_env: {'pip': {'packages': ['lmdeploy==0.18.0']" in out.stdout
    assert "Agent-self_consistency: SGLang program deployments.programs:self_consistency -> its own engine" in out.stdout


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
    assert tp["placement_group_bundles"] == [{"CPU": 2, "NPU": 1, "accelerator_type:Ascend910B": 0.001}, {"NPU": 1}, {"NPU": 1}, {"NPU": 1}]
    assert tp["ray_actor_options"]["resources"] == {"NPU": 1}


def test_autoscaling_options_fixed_and_ranged():
    cfg = parse_args(_model(replicas={"min": 2, "max": 2}))
    assert deployment_scaling_options(cfg.models[0].replicas)["num_replicas"] == 2
    cfg = parse_args(_model(replicas={"min": 0, "max": 4, "target_ongoing_requests": 4}, runtime_env={"env_vars": {"A": "1"}}))
    opts = model_deployment_options(model_pools(cfg.models[0])[0])
    assert opts["autoscaling_config"]["min_replicas"] == 0 and opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["ray_actor_options"]["runtime_env"] == {"env_vars": {**SERVE_FAST_PATH_ENV, "A": "1"}}
    assert opts["name"] == "BaseModel-m"
