"""Oversized requests against the session's application, while other requests stream: a 20 MB
prompt is refused (400, context length) before it is tokenized, a 65 MB body (413) before it is
read; neither stalls a replica (no restart, the streams finish whole) nor grows any of Serve's
processes by more than a few hundred MB."""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil

from tests.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MB = 1024 * 1024


def _serve_processes() -> dict[int, tuple[str, int]]:
    """pid -> (title, RSS) of every Serve process on this machine: proxy, controller, replicas."""
    found = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = p.info["cmdline"] or []
        if cmd and (cmd[0].startswith("ray::ServeReplica:tandem:") or cmd[0].startswith("ray::ProxyActor")):
            found[p.pid] = (cmd[0], p.info["memory_info"].rss)
    return found


def test_huge_prompt_and_body_are_refused_fast_while_streams_go_on(tandem_app):
    before = _serve_processes()
    assert any("BaseModel-tiny-chat" in title for title, _ in before.values()) and any("Gateway" in t for t, _ in before.values())
    stream_body = {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(tandem_app + "/v1/completions", json=stream_body, headers=HEADERS, timeout=120).json()["choices"][0]["text"]

    async def stream() -> str:
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", tandem_app + "/v1/completions", json={**stream_body, "stream": True}, headers=HEADERS) as r:
                assert r.status_code == 200
                text = ""
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
                return text

    async def timed(coro) -> tuple[float, httpx.Response]:
        start = time.monotonic()
        r = await coro
        return time.monotonic() - start, r

    async def scenario():
        streams = [asyncio.create_task(stream()) for _ in range(3)]
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(timeout=120) as client:
            huge_prompt = {"model": "tiny-chat", "messages": [{"role": "user", "content": "a " * 10_000_000}]}
            prompt = await timed(client.post(tandem_app + "/v1/chat/completions", json=huge_prompt, headers=HEADERS))
            body = await timed(client.post(
                tandem_app + "/v1/chat/completions", content=b"x" * (65 * MB), headers={**HEADERS, "Content-Type": "application/json"}
            ))
        return prompt, body, await asyncio.gather(*streams)

    (prompt_s, prompt), (body_s, body), texts = asyncio.run(scenario())

    assert prompt.status_code == 400, prompt.text[:500]
    assert prompt.json()["error"]["code"] == "context_length_exceeded"
    assert prompt.json()["error"]["message"] == (
        "This model's maximum context length is 2048 tokens, but the prompt has 20000000 characters, "
        "more than 2048 tokens of this model can hold."
    )
    assert prompt_s < 10, prompt_s
    assert body.status_code == 413 and body.json()["error"]["code"] == "request_too_large"
    assert body_s < 5, body_s
    assert texts == [expected] * 3

    after = _serve_processes()
    # The same processes (no replica was restarted), none grown by more than a few hundred MB.
    assert set(before) <= set(after), {pid: t for pid, (t, _) in before.items() if pid not in after}
    growth = {after[pid][0]: (after[pid][1] - rss) // MB for pid, (_, rss) in before.items()}
    assert max(growth.values()) < 300, growth
