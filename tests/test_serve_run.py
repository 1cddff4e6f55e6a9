"""`serve run cluster.yaml` the way a user runs it: a subprocess with its own local Ray cluster,
queried over HTTP with the openai client, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
STARTUP_TIMEOUT_S = 420


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            r = httpx.get(url + "/health", timeout=5)
            # Tandem's own health answer, not whatever else might listen there.
            if r.status_code == 200 and r.json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    pytest.fail(f"cluster not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_run_default_config(tmp_path):
    # The shipped cluster.yaml, on a free port so it cannot collide with anything else.
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "TANDEM_API_KEYS"}
    # Its own local Ray cluster, as on a fresh machine: without an address, `serve run` would join the
    # test session's cluster (Ray finds the newest local cluster) and redeploy the session's app.
    env["RAY_ADDRESS"] = "local"
    serve = Path(sys.executable).parent / "serve"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(serve), "run", str(path)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True, temperature=0
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip()
    finally:
        _stop(proc)
    assert proc.returncode is not None
