"""`/openapi.json` tells the truth: Schemathesis fuzzes the live gateway of the test session against
it (cluster/openapi.py), and the published request schemas accept and refuse what the gateway does.

The fuzzing is bounded for a shared 2-core machine: a fixed seed (the same requests on every run),
a set number of examples per operation (`BUDGET`), and generated bodies capped so that a request
generates a few tokens at most (`_cap`). Besides Schemathesis' checks (no 5xx; status, content type
and body as documented), no error message may carry a Ray traceback.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure

from cluster.openapi import ROUTES
from tests.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# A longer or different run, by hand: TANDEM_FUZZ_SCALE=10 TANDEM_FUZZ_SEED=1 pytest tests/test_openapi.py
SEED = int(os.environ.get("TANDEM_FUZZ_SEED", "20261202"))
SCALE = float(os.environ.get("TANDEM_FUZZ_SCALE", "1"))
MODELS = ("tiny-chat", "tiny-chat-b")
AGENT = "safe_response"
# Caps on what one generated request may ask to generate (a real model answers on 2 shared cores).
MAX_TOKENS = 4
MAX_N = 2

# Examples per operation (positive: bodies the schema allows; negative: bodies it refuses): about
# 745 requests, ~35 s of fuzzing on the 2-core test machine (the session cluster's start is apart).
# The generating operations get the most: their bodies are the large input space, and `_cap` keeps
# each one to a few tokens. A GET without parameters has one request to send. Agents: generated
# argument objects do not match a program's arguments (a 400 or 404 before any run; a real run is
# several model calls of the program's own length), so fewer examples cover them.
BUDGET: dict[str, tuple[int, int]] = {
    "GET /health": (1, 0),
    "GET /v1/pools": (1, 0),
    "GET /v1/cluster": (1, 0),
    "GET /v1/models": (1, 0),
    "POST /v1/chat/completions": (150, 50),
    "POST /v1/completions": (120, 40),
    "GET /get_model_info": (1, 0),
    "GET /server_info": (1, 0),
    "POST /flush_cache": (1, 0),
    "POST /generate": (120, 40),
    "POST /tokenize": (40, 20),
    "POST /detokenize": (30, 15),
    "GET /v1/agents": (1, 0),
    "POST /v1/agents/{name}": (30, 20),
}


@pytest.fixture(scope="module")
def openapi(tandem_app) -> dict:
    r = httpx.get(tandem_app + "/openapi.json", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _cap_int(container: dict, key: str, cap: int, context: int) -> None:
    """Lower a token count to `cap`, except one of the model's whole context or more: that one is
    refused before anything is generated (a cheap 400 worth sending)."""
    value = container.get(key)
    if _number(value) and cap < value < context:
        container[key] = cap


def _number(value) -> bool:
    # JSON's 9.0 is an integer too (JSON Schema, and pydantic's lax mode, say so).
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cap(case, choice: int, context: int):
    """Keep a generated request cheap: few tokens, few samples, and (mostly) a model that exists, so
    that generation really runs; values the schema refuses (negative examples) are left as they are.
    `choice` (0-3, drawn with the case) picks the model or path: 3 keeps the generated one."""
    body = case.body
    if case.operation.path == "/v1/agents/{name}":
        if choice < 2 and isinstance(case.path_parameters, dict):
            case.path_parameters["name"] = AGENT
        return case
    if not isinstance(body, dict):
        return case
    if case.operation.path in ("/v1/chat/completions", "/v1/completions"):
        if choice < 3 and isinstance(body.get("model"), str):
            body["model"] = MODELS[choice % 2]
        for key in ("max_tokens", "max_completion_tokens"):
            _cap_int(body, key, MAX_TOKENS, context)
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
        if _number(body.get("n")) and body["n"] > MAX_N:
            body["n"] = MAX_N
    elif case.operation.path == "/generate":
        params = body.setdefault("sampling_params", {})
        if isinstance(params, dict):
            params.setdefault("max_new_tokens", MAX_TOKENS)
            _cap_int(params, "max_new_tokens", MAX_TOKENS, context)
    return case


# What an error message must not carry: a Ray traceback (terminal colours, `ray::` actor names,
# file paths) is no message for a client.
LEAKS = ("\x1b[", "ray::", "Traceback (most recent call last)", 'File "/')


def _leaked_errors(response) -> list[str]:
    """Error messages of the response (its body, or its stream's error events) that leak internals."""
    messages = []
    headers = {k.lower(): v for k, v in response.headers.items()}
    content_type = headers.get("content-type") or [""]
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    else:
        events = [response.text]
    for event in events:
        try:
            error = json.loads(event).get("error")
        except (ValueError, AttributeError):
            continue
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            messages.append(error["message"])
    return [m for m in messages if any(leak in m for leak in LEAKS)]


def _checks():
    from schemathesis import checks

    return [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance]


def _titles(error: BaseException) -> list[str]:
    failures = error.exceptions if isinstance(error, BaseExceptionGroup) else [error]
    return [getattr(f, "title", type(f).__name__) for f in failures]


def _request(case) -> str:
    """The request, to reproduce a finding (Schemathesis' curl command hides every `*token*` field)."""
    body = case.body if isinstance(case.body, (dict, list, str, int, float, bool)) or case.body is None else "(no body)"
    query = f"?{case.query}" if case.query else ""
    return f"{case.method.upper()} {case.formatted_path}{query} {json.dumps(body, ensure_ascii=True, default=repr)}"


def _fuzz(op, mode: GenerationMode, examples: int, context: int, send) -> None:
    """`send` each of `examples` cases Schemathesis generates for `op` (capped by `_cap`)."""
    strategy = st.tuples(op.as_strategy(generation_mode=mode), st.integers(0, 3)).map(lambda pair: _cap(*pair, context))

    # One seed for every operation and mode, no example database, no shrinking: the same requests
    # on every run, and a bounded number of them.
    @seed(SEED)
    @settings(
        max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), print_blob=False,
    )
    @given(case=strategy)
    def fuzz(case):
        send(case)

    fuzz()


def test_schemathesis_fuzz_finds_no_server_error_and_no_schema_mismatch(tandem_app, openapi):
    schema = schemathesis.openapi.from_dict(openapi)
    operations = {}
    for result in schema.get_all_operations():
        op = result.ok()
        operations[f"{op.method.upper()} {op.path}"] = op
    assert set(operations) == set(BUDGET), "every operation of /openapi.json gets a budget"

    session = requests.Session()
    context = session.get(tandem_app + "/get_model_info", headers=AUTH, timeout=60).json()["max_context_length"]
    checks = _checks()
    findings: dict[tuple, str] = {}
    statuses: dict[str, Counter] = {label: Counter() for label in BUDGET}
    timings: dict[str, float] = {}

    def send(label: str, mode: GenerationMode, case) -> None:
        response = None
        try:
            response = case.call(base_url=tandem_app, session=session, headers=AUTH, timeout=60)
            statuses[label][response.status_code] += 1
            case.validate_response(response, checks=checks, headers=AUTH)
            leaked = _leaked_errors(response)
            if leaked:
                raise Failure(operation=label, title="Error message leaks a traceback", message=leaked[0][:300])
        except (Failure, BaseExceptionGroup, requests.RequestException) as e:
            # Collected, not raised: one run reports every distinct finding.
            status = response.status_code if response is not None else "no response"
            key = (label, status, tuple(_titles(e)))
            if key not in findings:
                body = response.text[:500] if response is not None else repr(e)
                findings[key] = f"{label} ({mode.value}) -> {status}: {'; '.join(key[2])}\n  {_request(case)}\n  -> {body}"

    started = time.monotonic()
    for label, op in operations.items():
        t0 = time.monotonic()
        for mode, examples in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), BUDGET[label]):
            if examples:
                examples = max(1, round(examples * SCALE))
                _fuzz(op, mode, examples, context, lambda case, label=label, mode=mode: send(label, mode, case))
        timings[label] = round(time.monotonic() - t0, 1)
    elapsed = time.monotonic() - started
    summary = f"{elapsed:.0f} s; per operation: {timings}; statuses: { {k: dict(v) for k, v in statuses.items()} }"
    print(summary)
    assert not findings, f"{len(findings)} finding(s) ({summary}):\n\n" + "\n\n".join(findings.values())
    # The fuzzing reached the models (200s) and their checks (400s), not only 404s.
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /generate"):
        assert statuses[label][200] > 0 and statuses[label][400] > 0, summary


# -- the schema itself -----------------------------------------------------------------------------


def test_openapi_documents_every_route_with_bodies_and_errors(openapi):
    ops = {(m, p): op for p, methods in openapi["paths"].items() for m, op in methods.items()}
    assert set(ops) == set(ROUTES), "every route of the gateway in the schema is described by cluster/openapi.py"
    # The console's routes are not part of the API.
    assert not any(p == "/" or p.startswith("/console") for _, p in ops)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    bodies = {
        ("post", "/v1/chat/completions"): "ChatCompletionRequest",
        ("post", "/v1/completions"): "CompletionRequest",
        ("post", "/generate"): "GenerateRequest",
        ("post", "/v1/agents/{name}"): "AgentArguments",
    }
    for key, name in bodies.items():
        body = ops[key]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert name in openapi["components"]["schemas"]
    assert "requestBody" not in ops[("post", "/flush_cache")]
    for key, op in ops.items():
        responses = op["responses"]
        assert "422" not in responses, key  # FastAPI's validation errors: the gateway answers 400
        assert responses["200"]["content"]["application/json"]["schema"], key
        if key[1] != "/health":
            assert responses["401"]["content"]["application/json"]["schema"] == error_ref, key
    for key in bodies:
        assert "text/event-stream" in ops[key]["responses"]["200"]["content"], key
        assert ops[key]["responses"]["400"]["content"]["application/json"]["schema"] == error_ref
    assert ops[("post", "/v1/chat/completions")]["responses"]["404"]["content"]["application/json"]["schema"] == error_ref
    # Every $ref resolves.
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(openapi)
    missing = [r for r in refs if r.removeprefix("#/components/schemas/") not in openapi["components"]["schemas"]]
    assert not missing


def _validator(openapi: dict, name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]}
    return jsonschema.Draft202012Validator(schema)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "tiny-chat", "messages": QUESTION, "max_tokens": 2}, 200),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2}, 200),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, 400),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": None}]}, 400),
        ({"model": "tiny-chat", "messages": QUESTION, "frobnicate": 1}, 400),
        ({"model": "tiny-chat", "messages": []}, 400),
    ],
    ids=["text", "text-parts", "image-part", "null-content", "unknown-argument", "no-messages"],
)
def test_chat_request_schema_accepts_what_the_gateway_accepts(openapi, base_url, body, status):
    """The published request schema and the gateway agree: accepted by one iff by the other."""
    valid = _validator(openapi, "ChatCompletionRequest").is_valid(body)
    r = httpx.post(base_url + "/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    assert valid == (status == 200), f"schema says valid={valid}, the gateway answered {r.status_code}"


def test_every_operation_answers_a_missing_key_as_documented(tandem_app, openapi):
    """401 (or, for /health, no key needed) with the documented status and body, on every operation."""
    schema = schemathesis.openapi.from_dict(openapi)
    for result in schema.get_all_operations():
        op = result.ok()
        path = op.path.replace("{name}", AGENT)
        body = {} if op.method.upper() == "POST" else None
        r = httpx.request(op.method.upper(), tandem_app + path, json=body, timeout=60)
        expected = 200 if op.path == "/health" else 401
        assert r.status_code == expected, (op.label, r.text)
        assert str(r.status_code) in openapi["paths"][op.path][op.method]["responses"], op.label
        op.validate_response(r)
