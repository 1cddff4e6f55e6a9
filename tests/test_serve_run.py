"""`make serve` the way a user runs it (`python -m cluster run cluster.yaml`, which runs Ray's
`serve run cluster.yaml`): a subprocess with its own local Ray cluster, queried over HTTP with the
openai client, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
STARTUP_TIMEOUT_S = 420
SHUTDOWN_TIMEOUT_S = 60


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


def _tree(proc: subprocess.Popen) -> dict[psutil.Process, str]:
    """`serve run` and every process under it, with their names: the local Ray cluster it started
    (GCS, raylet, workers and the replicas in them)."""
    root = psutil.Process(proc.pid)
    tree = {}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree[p] = p.name()
    return tree


def _alive(processes) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running: the same process, not a reused pid
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _cmdline(p: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return p.cmdline()
    return []


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=5)
    except httpx.TransportError:  # refused (or, still closing, reset / timed out)
        return False
    return True


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
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster", "run", str(path)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: dict[psutil.Process, str] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        tree = _tree(proc)
        assert {"raylet", "gcs_server"} <= set(tree.values()), sorted(tree.values())
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True, temperature=0
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "The capital of France is Paris."
        # It said when the application answered, and where (announced within a poll of /health).
        deadline = time.monotonic() + 10
        while "Tandem is ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        output = log.read_text()
        assert f"OpenAI API  http://127.0.0.1:{port}/v1\n" in output, output[-4000:]
        assert f"console     http://127.0.0.1:{port}/\n" in output and "preparing builtin:tiny-chat" in output

        assert {"serve"} <= {Path(c).name for p in tree for c in _cmdline(p)[:2]}, "serve run is not under cluster run"
        # SIGTERM (as a process manager stops it) while a stream is in flight: the stream finishes
        # whole, then serve run shuts Serve down and exits 0 (not the SIGKILL fallback of _stop),
        # and takes its Ray cluster with it: no process of the tree is left, the port stops answering.
        request = {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "extra_body": {"ignore_eos": True}}
        expected = client.completions.create(**request).choices[0].text
        chunks = iter(client.completions.create(**request, stream=True))
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length", rest[-1]
        assert "".join(c.choices[0].text for c in [first, *rest] if c.choices) == expected
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        assert proc.returncode == 0, log.read_text()[-4000:]
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while (_alive(tree) or _answers(url)) and time.monotonic() < deadline:
            time.sleep(1)
        left = [f"{p.pid} {tree[p]}" for p in _alive(tree)]
        assert not left, f"still running {SHUTDOWN_TIMEOUT_S}s after serve run exited: {left}"
        assert not _answers(url), f"port {port} still answers after serve run exited"
    finally:
        _stop(proc)
        for p in _alive(tree):  # what a failed shutdown left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
