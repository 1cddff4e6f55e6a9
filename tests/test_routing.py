"""Which replica serves a request: `routing: session` (x-session-id / `user`), `routing: prefix`
(Ray Serve LLM's PrefixCacheAffinityRouter, reading Tandem's calls), and the engines' prefix-cache
counts that make routing worth it. Replicas are told apart by the gateway's x-tandem-replica header."""

from __future__ import annotations

import uuid

import httpx
import pytest

from cluster.app import BASE_MODEL_ROUTERS, model_deployment_options
from cluster.resolve import model_pools, parse_args
from deployments.engines.transformers_engine import TransformersEngine
from tests.conftest import API_KEY, deploy_second_app
from tests.engine_helpers import collect, make_request

APP, PREFIX = "routing-test", "/routing-test"
SYSTEM = "You are a helpful assistant."
# Two replicas with prefix routing; 16-token KV pages, so that short chats fill whole pages (only
# whole pages are shared).
ROUTING_ARGS = {
    "models": [
        {
            "name": "prefix-chat", "source": "builtin:tiny-chat", "engine": "transformers", "routing": "prefix",
            "engine_args": {"block_size": 16, "num_threads": 1},
            "accelerator": {"kind": "cpu", "cpus": 0.2}, "replicas": {"min": 2, "max": 2},
        },
    ],
    "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.05},
}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def chat(url: str, model: str, messages: list[dict], headers: dict | None = None, **kw) -> tuple[str, str]:
    """(answer, replica that served it)."""
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.headers["x-tandem-replica"]


# -- config: each routing is one of Serve's routers ------------------------------------------------


@pytest.mark.parametrize(("routing", "router"), [
    ("session", "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"),
    ("prefix", "deployments.routing:PromptPrefixRouter"),
])
def test_routing_picks_serves_router(routing, router):
    cfg = parse_args({"models": [{"name": "m", "source": "builtin:tiny-chat", "routing": routing}]})
    options = model_deployment_options(model_pools(cfg.models[0])[0])
    assert options["request_router_config"].request_router_class == router
    if routing == "prefix":  # affinity yields to load beyond the autoscaling target (default 8)
        assert options["request_router_config"].request_router_kwargs == {"imbalanced_threshold": 8.0}


def test_least_loaded_is_serves_default_router_and_a_bad_routing_names_the_choices():
    from ray.serve.config import RequestRouterConfig

    assert BASE_MODEL_ROUTERS["least_loaded"].request_router_class == RequestRouterConfig().request_router_class
    with pytest.raises(ValueError, match=r"models\[0\]\.routing.*'session', 'prefix' or 'least_loaded'"):
        parse_args({"models": [{"name": "m", "source": "builtin:tiny-chat", "routing": "random"}]})


# -- session routing over HTTP (the session app's tiny-chat: 3 replicas, routing: session) ----------


def test_a_session_stays_on_one_replica_and_sessions_spread(base_url):
    url = base_url.removesuffix("/v1")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for header, user in ((f"conv-{uuid.uuid4().hex}", None), (None, f"user-{uuid.uuid4().hex}")):
        replicas = {chat(url, "tiny-chat", question, {"x-session-id": header} if header else None,
                         **({"user": user} if user else {}))[1] for _ in range(6)}
        assert len(replicas) == 1, replicas
    # Without a session, and across sessions, requests spread (3 replicas: all on one would be
    # (1/3)^11 for 12 sessions).
    spread = {chat(url, "tiny-chat", question, {"x-session-id": f"s-{uuid.uuid4().hex}"})[1] for _ in range(12)}
    assert len(spread) >= 2, spread


def test_a_streamed_answer_names_its_replica_too(base_url):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", base_url.removesuffix("/v1") + "/v1/chat/completions", json=body,
                      headers={**AUTH, "x-session-id": "streamed"}, timeout=60) as r:
        assert r.status_code == 200
        replica = r.headers["x-tandem-replica"]
        r.read()
    assert replica and replica == chat(base_url.removesuffix("/v1"), "tiny-chat", [{"role": "user", "content": "Hi"}],
                                      {"x-session-id": "streamed"})[1]


# -- prefix routing: a second app on the session's Serve instance ----------------------------------


@pytest.fixture(scope="module")
def routing_app(tandem_app):
    from ray import serve

    def ready(url: str) -> bool:
        r = httpx.get(url + "/v1/pools", headers=AUTH, timeout=10)
        return r.status_code == 200 and r.json()["data"][0]["pools"][0]["replicas"]["running"] == 2

    url = deploy_second_app(tandem_app, ROUTING_ARGS, APP, PREFIX, ready)
    yield url
    serve.delete(APP, _blocking=False)


def test_prefix_routing_keeps_each_conversation_on_the_replica_holding_its_history(routing_app):
    questions = ["What is the capital of France?", "What color is the sky?", "How many days are in a week?"]
    # The router's tree holds prompts, not answers: a turn matches its history's prompts, which must be
    # a good part (>= 10%) of its text. Openings share no prefix with each other.
    starts = ["Describe the ocean in a few words, please.", "Who wrote Romeo and Juliet, and when?",
              "Count from 1 to 20, one number at a time.", "Give me three colors of the rainbow."]
    served: dict[str, list[str]] = {}
    for start in starts:  # each conversation grows turn by turn, as a chat client resends its history
        messages = [{"role": "user", "content": start}]
        for question in questions:
            answer, replica = chat(routing_app, "prefix-chat", messages)
            served.setdefault(start, []).append(replica)
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    assert all(len(set(replicas)) == 1 for replicas in served.values()), served
    # A new conversation (no prefix in common with the others) goes to the replica holding the least
    # text: both replicas get some.
    assert len({replicas[0] for replicas in served.values()}) == 2, served
    # And the engines served the repeated history from their prefix caches.
    view = httpx.get(routing_app + "/v1/cluster", headers=AUTH, timeout=30).json()
    stats = view["models"][0]["pools"][0]["engine_stats"]
    assert stats["cached_prompt_tokens"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1, stats
    assert stats["prompt_tokens"] == sum(r["prompt_tokens"] for r in stats["replicas"])


# -- the engine's prefix-cache counts ------------------------------------------------------------------


async def test_transformers_engine_counts_prompt_tokens_served_from_its_prefix_cache(model_path, tokenizer):
    eng = TransformersEngine(model_path, {"max_model_len": 256, "block_size": 16, "num_threads": 1})
    await eng.start()
    try:
        def prompt(question: str) -> list[int]:
            system = SYSTEM + " Answer in one short sentence, and keep it simple and clear."
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)

        long, other = prompt("What is the capital of France?"), prompt("What is the capital of Japan?")
        start = eng.stats()  # (the engine's warm-up request counts too)
        await collect(eng, make_request(ids=long, max_tokens=4, temperature=0))
        first = eng.stats()
        assert (first.prompt_tokens - start.prompt_tokens, first.cached_prompt_tokens - start.cached_prompt_tokens) == (len(long), 0)
        await collect(eng, make_request(ids=other, max_tokens=4, temperature=0))
        shared = next(i for i, (a, b) in enumerate(zip(long, other)) if a != b)
        # Whole 16-token pages of the shared prefix come from the cache.
        second = eng.stats()
        assert second.cached_prompt_tokens - first.cached_prompt_tokens == 16 * (shared // 16) > 0
        assert second.prompt_tokens - first.prompt_tokens == len(other)
    finally:
        await eng.shutdown()
