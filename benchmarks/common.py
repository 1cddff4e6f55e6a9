"""What every benchmark script shares: its own local Ray cluster, and where results go."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def start_local_ray(num_cpus: int = 8) -> None:
    """A fresh local Ray cluster (`address="local"`: never one already running on the machine),
    with more logical CPUs than cores: replicas take fractions and mostly wait on each other."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )


def write_results(name: str, payload: dict) -> Path:
    """Writes `benchmarks/results/<name>-<timestamp>.json` (git-ignored) and returns its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(payload, indent=2))
    return out


def free_port() -> int:
    """A free loopback port for a benchmark's Serve proxy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN for none."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]
