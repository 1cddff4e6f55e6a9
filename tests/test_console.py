"""The web console (`GET /`, `/console`; cluster/console/) in a real browser, and `GET /v1/cluster`.

Chromium is Debian's (`/usr/bin/chromium`, installed by `make test`), driven by Playwright; its
own browser download is not used. A browser that cannot be launched fails these tests, saying why.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import API_KEY, ROOT

CHROMIUM = os.environ.get("TANDEM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = ROOT / "test-results" / "console.png"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."  # the greedy answer after the agent programs' system prompt
# A second application with a one-replica model, at its own route prefix: its replica count changes
# without disturbing the session app other tests use.
APP, PREFIX = "console-test", "/console-test"


def _scaled_args(replicas: int) -> dict:
    return {
        "models": [
            {
                "name": "scaled",
                "source": "builtin:tiny-chat",
                "engine": "transformers",
                "accelerator": {"kind": "cpu", "cpus": 0.1},
                "replicas": {"min": replicas, "max": replicas},
            }
        ],
        "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.05},
    }


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright is not installed ({e}): `pip install -e '.[test]'` installs it")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's (`apt-get install -y chromium`; `make test` does) or set TANDEM_CHROMIUM")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
    except Exception as e:  # noqa: BLE001 - reported as the failure
        pw.stop()
        pytest.fail(f"cannot launch Chromium ({CHROMIUM}) with Playwright: {e}")
    yield browser
    browser.close()
    pw.stop()


class Console:
    """A browser tab on the console; collects console errors and uncaught page errors."""

    def __init__(self, browser, url: str, key: str | None = API_KEY):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1100})
        if key is not None:
            # As if the key had been entered earlier in this tab.
            self.context.add_init_script(f"sessionStorage.setItem('tandem-api-key', {key!r});")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.goto(url)

    def field(self, model: str, pool: str, name: str):
        return self.page.locator(f'.model[data-model="{model}"] tr.pool[data-pool="{pool}"] [data-field="{name}"]')

    def close(self):
        self.context.close()


@pytest.fixture
def console(chromium, tandem_app):
    tabs: list[Console] = []

    def open_tab(path: str = "/", key: str | None = API_KEY) -> Console:
        tab = Console(chromium, tandem_app + path, key)
        tabs.append(tab)
        return tab

    yield open_tab
    for tab in tabs:
        tab.close()


def _cluster(url: str) -> dict:
    r = httpx.get(url + "/v1/cluster", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_for(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


# -- /v1/cluster ---------------------------------------------------------------------------------------


def test_cluster_view_reports_pools_engines_and_agents(tandem_app):
    assert httpx.get(tandem_app + "/v1/cluster", timeout=30).status_code == 401
    view = _cluster(tandem_app)
    assert view["object"] == "cluster"
    assert view["gateway"]["auth"] is True and view["gateway"]["version"] == "0.1.0"
    assert abs(view["gateway"]["time"] - time.time()) < 30
    models = {m["model"]: m["pools"] for m in view["models"]}
    assert sorted(models) == ["tiny-chat", "tiny-chat-b"]
    (pool,) = models["tiny-chat"]
    assert (pool["pool"], pool["deployment"], pool["engine"]) == ("default", "BaseModel-tiny-chat", "transformers")
    assert pool["replicas"] == {"running": 3, "starting": 0, "min": 3, "max": 3}
    stats = pool["engine_stats"]
    # Gathered from every running replica: three distinct replica ids.
    assert stats["replicas_reporting"] == 3 and len({r["replica"] for r in stats["replicas"]}) == 3, stats
    assert set(stats) == {"running", "waiting", "kv_cache_usage", "tokens_per_s", "replicas_reporting", "replicas",
                          "prompt_tokens", "cached_prompt_tokens", "prefix_cache_hit_rate"}
    agents = {a["name"]: a for a in view["agents"]}
    assert sorted(agents) == ["multi_step_reasoning", "safe_response", "self_consistency"]
    sc = agents["self_consistency"]
    assert (sc["program"], sc["required"], sc["replicas"]) == ("deployments.programs:self_consistency", ["question"], {"running": 1, "starting": 0})
    assert sc["arguments"][0] == "question" and "num_drafts" in sc["arguments"]


def test_agent_runs_and_errors_are_counted(tandem_app):
    before = {a["name"]: a for a in _cluster(tandem_app)["agents"]}["multi_step_reasoning"]
    ok = httpx.post(tandem_app + "/v1/agents/multi_step_reasoning", json={"question": QUESTION}, headers=AUTH, timeout=120)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(tandem_app + "/v1/agents/multi_step_reasoning", json={"nope": 1}, headers=AUTH, timeout=120)
    assert bad.status_code == 400, bad.text
    time.sleep(0.6)  # past the view's cache
    after = {a["name"]: a for a in _cluster(tandem_app)["agents"]}["multi_step_reasoning"]
    assert (after["runs"] - before["runs"], after["errors"] - before["errors"]) == (2, 1)
    assert after["p50_run_s"] is not None and 0 < after["p50_run_s"] < 120


def test_console_files_need_no_key(tandem_app):
    for path, kind in (("/", "text/html"), ("/console", "text/html"), ("/console/app.js", "text/javascript"), ("/console/style.css", "text/css")):
        r = httpx.get(tandem_app + path, timeout=30)
        assert (r.status_code, r.headers["content-type"].split(";")[0]) == (200, kind), path
    assert httpx.get(tandem_app + "/console/secret.txt", timeout=30).status_code == 404
    assert httpx.get(tandem_app + "/console/../gateway.py", timeout=30).status_code == 404


# -- the page --------------------------------------------------------------------------------------------


def test_console_loads_without_errors_and_shows_pools_and_agents(console):
    from playwright.sync_api import expect

    tab = console("/console")
    expect(tab.field("tiny-chat", "default", "replicas")).to_have_text("3 running, 0 starting (min 3, max 3)", timeout=60_000)
    expect(tab.field("tiny-chat-b", "default", "replicas")).to_have_text("1 running, 0 starting (min 1, max 1)")
    expect(tab.field("tiny-chat", "default", "engine")).to_have_text("transformers")
    expect(tab.field("tiny-chat", "default", "accelerator")).to_have_text("cpu")
    expect(tab.field("tiny-chat", "default", "status")).to_have_text("HEALTHY")
    expect(tab.page.locator("#agents tr.agent")).to_have_count(3)
    expect(tab.page.locator('#agents tr[data-agent="safe_response"] [data-field="program"]')).to_have_text("deployments.programs:safe_response")
    required = tab.page.locator('#agents tr[data-agent="self_consistency"] [data-field="arguments"] code.required')
    expect(required).to_have_text(["question"])
    # Sparklines accumulate client-side: after a few polls the line has points.
    expect(tab.page.locator('.model[data-model="tiny-chat"] svg.spark polyline').first).to_have_count(1, timeout=10_000)
    expect(tab.page.locator("#chat-model option")).to_have_text(
        ["tiny-chat", "tiny-chat-b", "agent:multi_step_reasoning", "agent:safe_response", "agent:self_consistency"]
    )
    time.sleep(2)  # a poll or two more
    assert tab.errors == []


def test_console_asks_for_a_key_and_shows_the_apis_401(console):
    from playwright.sync_api import expect

    tab = console("/", key=None)
    page = tab.page
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#api-key", "sk-wrong")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_have_text("Incorrect API key provided. [invalid_api_key, HTTP 401]")
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#api-key", API_KEY)
    page.click("#key-form button")
    expect(tab.field("tiny-chat", "default", "replicas")).to_have_text("3 running, 0 starting (min 3, max 3)", timeout=60_000)
    expect(page.locator("#key-panel")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('tandem-api-key')") == API_KEY
    # The only errors: the browser's own log lines for the two 401 responses.
    assert all("401" in e for e in tab.errors) and len(tab.errors) >= 2, tab.errors


def test_console_follows_a_scale_change_under_a_route_prefix(console, tandem_app):
    from playwright.sync_api import expect
    from ray import serve

    from cluster.app import build_app

    serve._run(build_app(_scaled_args(1)), name=APP, route_prefix=PREFIX, _blocking=False)
    url = tandem_app + PREFIX
    try:
        _wait_for("the console-test app", lambda: _try_cluster(url), timeout=180)
        # Without the trailing slash: redirected to PREFIX/, so the page's relative URLs stay under the prefix.
        tab = console(PREFIX)
        assert tab.page.url == url + "/"
        expect(tab.field("scaled", "default", "replicas")).to_have_text("1 running, 0 starting (min 1, max 1)", timeout=120_000)
        expect(tab.page.locator(".model")).to_have_count(1)
        serve._run(build_app(_scaled_args(2)), name=APP, route_prefix=PREFIX, _blocking=False)
        # The gateway is replaced too (its pool bounds changed); the page keeps polling through that.
        expect(tab.field("scaled", "default", "replicas")).to_have_text("2 running, 0 starting (min 2, max 2)", timeout=180_000)
        expect(tab.page.locator("#api-error")).to_be_hidden(timeout=30_000)
        view = _cluster(url)
        assert view["models"][0]["pools"][0]["engine_stats"]["replicas_reporting"] == 2
    finally:
        serve.delete(APP, _blocking=False)


def _try_cluster(url: str):
    try:
        view = _cluster(url)
    except (httpx.HTTPError, AssertionError):
        return None
    return view if view["models"][0]["pools"][0]["replicas"]["running"] == 1 else None


def _chat_in_page(tab, model: str, text: str, max_tokens: int = 64) -> str:
    from playwright.sync_api import expect

    page = tab.page
    expect(page.locator(f'#chat-model option[value="{model}"]')).to_have_count(1, timeout=60_000)
    page.select_option("#chat-model", model)
    page.fill("#chat-max-tokens", str(max_tokens))
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", text)
    page.click("#chat-send")
    expect(page.locator("#chat-output")).to_have_attribute("data-state", "done", timeout=120_000)
    return page.locator("#chat-output").text_content()


def test_playground_chat_streams_what_the_api_answers(console, client):
    tab = console()
    shown = _chat_in_page(tab, "tiny-chat", QUESTION)
    api = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0
    )
    assert shown == api.choices[0].message.content
    u = api.usage
    page = tab.page
    assert page.locator("#chat-usage").text_content() == (
        f"usage: {u.prompt_tokens} prompt + {u.completion_tokens} completion = {u.total_tokens} tokens"
    )
    assert page.locator("#chat-finish").text_content() == f"finish: {api.choices[0].finish_reason}"
    assert re.fullmatch(r"time to first token \d+ ms", page.locator("#chat-ttft").text_content())
    assert page.locator("#chat-error").text_content() == ""
    assert tab.errors == []


def test_playground_shows_a_reasoning_models_thinking_apart(console, client):
    tab = console()
    question = "Is 7 a prime number?"  # the built-in model thinks before this answer; tiny-chat splits it off
    shown = _chat_in_page(tab, "tiny-chat", question)
    api = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0)
    message, page = api.choices[0].message, tab.page
    assert shown == message.content == "Yes, 7 is a prime number."
    assert page.locator("#chat-reasoning").is_visible()
    assert page.locator("#chat-reasoning").text_content() == message.reasoning_content
    u = api.usage
    assert page.locator("#chat-usage").text_content() == (
        f"usage: {u.prompt_tokens} prompt + {u.completion_tokens} completion "
        f"({u.completion_tokens_details.reasoning_tokens} reasoning) = {u.total_tokens} tokens"
    )
    # A plain answer next hides the box again.
    _chat_in_page(tab, "tiny-chat", QUESTION)
    assert not page.locator("#chat-reasoning").is_visible()
    assert tab.errors == []


# The built-in model's greedy answers (tests/test_builtin_model.py): a short one, and a story whose
# token boundaries fall inside characters (a naive decoder would show U+FFFD there).
@pytest.mark.parametrize("prompt, start", [("你好", "你好！我是一个小模型。"), ("给我讲一个故事。", "从前有一只小猫")])
def test_playground_streams_chinese_without_replacement_characters(console, client, prompt, start):
    tab = console()
    # Room to finish (a length cut can end inside a character: the API then ends on U+FFFD itself).
    shown = _chat_in_page(tab, "tiny-chat", prompt, max_tokens=256)
    api = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": prompt}], max_tokens=256, temperature=0)
    expected = api.choices[0].message.content
    assert api.choices[0].finish_reason == "stop"
    assert expected.startswith(start) and "\ufffd" not in expected, expected
    if prompt == "你好":
        assert expected == start
    assert "\ufffd" not in shown
    assert shown == expected


def test_sse_reader_keeps_characters_split_across_network_chunks_whole(console):
    """The page's SSE reader fed one byte per chunk: every Chinese character arrives split."""
    tab = console()
    events = tab.page.evaluate("""async () => {
        const bytes = new TextEncoder().encode('data: {"text": "你好！我是一个小模型。"}\\n\\ndata: [DONE]\\n\\n');
        const body = new ReadableStream({start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b])); c.close(); }});
        const out = [];
        for await (const data of sseData(new Response(body))) out.push(data);
        return out;
    }""")
    assert events == ['{"text": "你好！我是一个小模型。"}', "[DONE]"]


def test_playground_shows_a_chat_error_as_the_api_gives_it(console):
    from playwright.sync_api import expect

    tab = console()
    page = tab.page
    expect(page.locator('#chat-model option[value="tiny-chat"]')).to_have_count(1, timeout=60_000)
    page.fill("#chat-max-tokens", "0")
    page.click("#chat-send")
    expect(page.locator("#chat-output")).to_have_attribute("data-state", "error", timeout=60_000)
    r = httpx.post(
        tab.page.url.rstrip("/") + "/v1/chat/completions", headers=AUTH, timeout=30,
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 0, "stream": True},
    )
    err = r.json()["error"]
    assert r.status_code == 400
    assert page.locator("#chat-error").text_content() == f"{err['message']} [{err['code']}, HTTP 400]"


def test_playground_agent_run_fills_in_its_variables(console, tandem_app):
    from playwright.sync_api import expect

    arguments = {"question": QUESTION}
    api = httpx.post(tandem_app + "/v1/agents/safe_response", json=arguments, headers=AUTH, timeout=120)
    assert api.status_code == 200, api.text
    variables = api.json()["variables"]
    # The built-in model's greedy run (tests/test_agents_http.py pins the same answer).
    assert variables == {"draft": ANSWER, "verdict": "safe", "corrected": "no", "answer": ANSWER}

    tab = console()
    page = tab.page
    expect(page.locator('#agent-name option[value="safe_response"]')).to_have_count(1, timeout=60_000)
    page.select_option("#agent-name", "safe_response")
    expect(page.locator("#agent-args input[data-arg]")).to_have_count(len(_agent(tandem_app, "safe_response")["arguments"]))
    page.fill('#agent-args input[data-arg="question"]', QUESTION)
    page.click("#agent-run")
    expect(page.locator("#agent-summary")).to_have_attribute("data-state", "done", timeout=120_000)
    cells = page.locator("#agent-variables dd")
    shown = {cells.nth(i).get_attribute("data-variable"): cells.nth(i) for i in range(cells.count())}
    assert sorted(shown) == sorted(variables)
    for name, value in variables.items():
        assert shown[name].text_content() == value, name
        # Streamed text that needed no correction from the final event.
        assert shown[name].get_attribute("data-source") == "stream", name
    assert page.locator("#agent-error").text_content() == ""
    assert re.fullmatch(r"done in \d+\.\d\d s · \d+ model calls · session [0-9a-f]{32}", page.locator("#agent-summary").text_content())
    # The run is counted; the agents table catches up within a poll or two.
    runs = _agent(tandem_app, "safe_response")["runs"]
    expect(page.locator('#agents tr[data-agent="safe_response"] [data-field="runs"]')).to_have_text(str(runs), timeout=10_000)
    assert tab.errors == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _agent(url: str, name: str) -> dict:
    time.sleep(0.6)  # past the view's cache
    return {a["name"]: a for a in _cluster(url)["agents"]}[name]

