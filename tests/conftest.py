"""One real local Ray cluster and one Tandem application per test session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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
        },
        {
            "name": "tiny-chat-b",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": {"kind": "cpu", "cpus": 0.25},
            "replicas": {"min": 1, "max": 1},
        },
    ],
    # The built-in SGLang programs, as cluster.yaml registers them.
    "agents": [
        {"name": name, "program": f"deployments.programs:{name}", "model": "tiny-chat", "cpus": 0.05}
        for name in ("multi_step_reasoning", "safe_response", "self_consistency")
    ],
    "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from deployments.builtin_models import resolve_model_source

    # Build the built-in model once, here, rather than inside a replica's start-up (where the
    # others would wait on its lock).
    resolve_model_source("builtin:tiny-chat")
    # More logical CPUs than cores: replicas take fractional CPUs and mostly wait on each other.
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        log_to_driver=False,
    )
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tandem_app(ray_cluster):
    """The Tandem application served over real HTTP on a loopback port. Yields the base URL."""
    from ray import serve

    from cluster.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(TEST_APP_ARGS), name="tandem", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.delete("tandem")


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
