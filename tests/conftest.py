"""One real local multi-node Ray cluster and one Tandem application per test session."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-tandem-test"
# Read by the gateway replica (Ray workers inherit the driver's environment).
os.environ["TANDEM_TEST_API_KEYS"] = f"{API_KEY},sk-second-key"

TEST_APP_ARGS = {
    "models": [
        {
            "name": "tiny-chat",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            # Three replicas: answers must not depend on which one serves a request, and the calls
            # of one agent run must stay on one of them.
            "accelerator": {"kind": "cpu", "cpus": 0.3},
            "replicas": {"min": 3, "max": 3},
            # As cluster.yaml: tool calls found by the format its chat template names, <think> split off.
            "tool_call_parser": "auto",
            "reasoning_parser": "qwen3",
        },
        {
            "name": "tiny-chat-b",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": {"kind": "cpu", "cpus": 0.25},
            "replicas": {"min": 1, "max": 1},
            "tool_call_parser": None,  # no parser: tool_choice "auto" is refused
        },
    ],
    # The built-in SGLang programs, as cluster.yaml registers them.
    "agents": [
        {"name": name, "program": f"deployments.programs:{name}", "model": "tiny-chat", "cpus": 0.05}
        for name in ("multi_step_reasoning", "safe_response", "self_consistency")
    ],
    "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.1},
}


# The session cluster is a real multi-node Ray cluster (ray.cluster_utils.Cluster: one raylet per
# node, all on this machine): a CPU head, plus two workers that stand in for accelerator nodes.
# Ray takes declared GPUs / NPUs at face value; an accelerator type is the node resource
# `accelerator_type:<type>` (what Ray sets on real GPU/NPU nodes), labels are Ray node labels.
HEAD_NODE = {
    "num_cpus": 8,
    "object_store_memory": 256 * 1024**2,
    # A lost node is declared dead after 5 failed health checks: 1 s apart here (3 s by default).
    "_system_config": {"health_check_period_ms": 1000},
}
GPU_LABELS = {"tandem/accelerator": "H100", "tandem/kind": "gpu"}
NPU_LABELS = {"tandem/accelerator": "Ascend910B", "tandem/kind": "npu"}
GPU_NODE = {"num_cpus": 2, "num_gpus": 4, "resources": {"accelerator_type:H100": 1}, "labels": GPU_LABELS}
NPU_NODE = {"num_cpus": 2, "resources": {"NPU": 8, "accelerator_type:Ascend910B": 1}, "labels": NPU_LABELS}
# Serve's controller puts "replicas not scheduled after N s" (with the resources they need) into
# the deployment status; 30 s by default. Read by the controller at start-up.
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "5")
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S", "5")


@dataclass
class MultiNode:
    cluster: Any  # ray.cluster_utils.Cluster
    head: Any  # ray._private.node.Node
    gpu: Any
    npu: Any

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, **node_args):
        return self.cluster.add_node(**{"object_store_memory": 80 * 1024**2, **node_args})


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. Ray's own processes take ephemeral
    ports (metrics, agents, workers) while a cluster starts; a port picked from that range can be
    taken by one of them before Serve's proxy binds it (seen: Ray's Prometheus endpoint answering
    the port a test had picked for Serve)."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, min(low, 32768))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from deployments.models.builtin import resolve_model_source

    # Build the built-in model once, here, rather than inside a replica's start-up (where the
    # others would wait on its lock).
    resolve_model_source("builtin:tiny-chat")
    from ray.cluster_utils import Cluster

    # More logical CPUs than cores: replicas take fractional CPUs and mostly wait on each other.
    # CPU-only replicas may land on any node; GPU/NPU-tagged ones only on the workers that have them.
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD_NODE, "include_dashboard": False})
    gpu = cluster.add_node(**GPU_NODE)
    npu = cluster.add_node(**NPU_NODE)
    ray.init(
        address=cluster.address,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        log_to_driver=False,
    )
    global _MULTINODE
    _MULTINODE = MultiNode(cluster, cluster.head_node, gpu, npu)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


_MULTINODE: MultiNode | None = None


@pytest.fixture(scope="session")
def multinode(ray_cluster) -> MultiNode:
    """The session cluster's nodes: `head`, `gpu` (4 GPU, H100), `npu` (8 NPU, Ascend910B)."""
    assert _MULTINODE is not None
    return _MULTINODE


@pytest.fixture(scope="session")
def serve_url(ray_cluster) -> str:
    """Serve started on the session cluster, its HTTP proxy on a loopback port. Yields the URL."""
    from ray import serve

    port = free_port()
    # One proxy, on the head: every node of this cluster shares the machine's address and port.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def tandem_app(serve_url):
    """The Tandem application served over real HTTP on a loopback port. Yields the base URL."""
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(TEST_APP_ARGS), name="tandem", route_prefix="/", blocking=False)
    yield serve_url
    serve.delete("tandem")


def deploy_second_app(tandem_app: str, args: dict[str, Any], name: str, route_prefix: str, ready, timeout_s: float = 180) -> str:
    """Another Tandem application on the session's Serve instance, at its own route prefix; returns its
    URL once `ready(url)` is true (HTTP errors and missing keys count as not ready). Not waiting for
    Serve's RUNNING state: an app may have a pool that never gets its replica."""
    import time

    import httpx
    from ray import serve

    from cluster.app import build_app

    serve._run(build_app(args), name=name, route_prefix=route_prefix, _blocking=False)
    url = tandem_app + route_prefix
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready(url):
                return url
        except (httpx.HTTPError, AssertionError, KeyError, IndexError):
            pass
        assert time.monotonic() < deadline, f"app {name} did not start"
        time.sleep(1)


@pytest.fixture(scope="session")
def base_url(tandem_app) -> str:
    return tandem_app + "/v1"


@pytest.fixture(scope="session")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(base_url):
    import openai

    return openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_handle(tandem_app):
    from ray import serve

    return serve.get_deployment_handle("BaseModel-tiny-chat", app_name="tandem")


# -- engine tests: the built-in model, its tokenizer, one started transformers engine per module ---------
# (Used by the test_*_engine.py, test_constraints.py and test_engine_seam.py modules; the libraries are
# imported inside the fixtures so that sessions that run only cluster tests do not load them.)

# Small steps so that prompts longer than 64 tokens are prefilled in chunks. One torch thread: on a
# shared 2-core box, 2-thread OpenMP regions stall whenever the other core is busy, which slows a
# tiny model's forward passes by 10-100x.
ENGINE_TEST_ARGS = {"max_num_seqs": 32, "max_model_len": 256, "max_batch_tokens": 64, "num_threads": 1}


@pytest.fixture(scope="module")
def model_path():
    from deployments.models.builtin import resolve_model_source

    return str(resolve_model_source("builtin:tiny-chat"))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def reference_model(model_path):
    """The built-in model in plain HF transformers, to check engines' outputs against. One torch thread
    for this (the main) thread too: on a shared 2-core box, 2-thread OpenMP regions stall whenever
    the other core is busy, which slows a tiny model's forward passes by 10-100x."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest_asyncio.fixture(scope="module")
async def engine(model_path):
    from deployments.engines.transformers_engine import TransformersEngine

    eng = TransformersEngine(model_path, ENGINE_TEST_ARGS)
    await eng.start()
    yield eng
    await eng.shutdown()
