"""Agent programs: SGLang frontend programs on agent replicas, calling the base model through handles.

Runs against the session's real local Ray cluster and the `tandem` application (model `tiny-chat`,
3 replicas behind a consistent-hash router). Agent deployments go into one extra Serve application,
`agents-test`, bound to the `tandem` app's base-model handle.
"""

from __future__ import annotations

import json
import time

import pytest
import sglang as sgl
from sglang.lang.chat_template import get_chat_template
from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

from deployments.agent import AgentProgramError, load_program, program_arguments
from deployments.agents.backend import (
    AgentLimitError,
    ChatTemplateError,
    HandleBackend,
    ModelContext,
    UnsupportedFeatureError,
    derive_chat_template,
    render_with_template,
)

APP = "agents-test"

AGENTS = {
    # name: (program, constructor kwargs). Few agents: each replica imports sglang (seconds of CPU).
    "suite": ("tests.agent_programs:suite", {}),  # the custom test programs, by name
    "limits": ("tests.agent_programs:loop_calls", {"max_calls": 3, "timeout_s": 1.5}),
}
# The built-in programs are registered in the `tandem` app's config (tests/conftest.py), as users do.
BUILTIN_AGENTS = {"reasoning": "multi_step_reasoning", "safe": "safe_response", "consistency": "self_consistency"}


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agents(tandem_app, model_handle):
    """The test-only agents in one application (one serve.run starts their replicas in parallel),
    plus the built-in agents of the `tandem` app."""
    from ray import serve

    from deployments.agent import AgentDeployment
    from tests.agent_programs import AgentIndex

    base = serve.get_deployment_handle("BaseModel-tiny-chat", app_name="tandem")
    bound = {
        name: AgentDeployment.options(name=f"Agent-{name}", ray_actor_options={"num_cpus": 0.05}).bind(
            name, program, base, **kwargs
        )
        for name, (program, kwargs) in AGENTS.items()
    }
    started = time.monotonic()
    serve.run(AgentIndex.bind(bound), name=APP, route_prefix=None)
    print(f"\nagents-test app up in {time.monotonic() - started:.1f}s")
    handles = {name: serve.get_deployment_handle(f"Agent-{name}", app_name=APP) for name in AGENTS}
    handles.update({k: serve.get_deployment_handle(f"Agent-{v}", app_name="tandem") for k, v in BUILTIN_AGENTS.items()})
    yield handles
    serve.delete(APP)


SUITE_PROGRAMS = {"gen-fork": "gen_and_fork", "choose": "choose", "constrained": "constrained", "story": "story",
                  "raising": "raising", "unsupported": "unsupported"}


def _call(agents, name, arguments):
    if name in SUITE_PROGRAMS:
        return agents["suite"], {"program": SUITE_PROGRAMS[name], "arguments": arguments}
    return agents[name], arguments


def run(agents, name, **arguments) -> dict:
    handle, arguments = _call(agents, name, arguments)
    return handle.run.remote(arguments).result(timeout_s=120)


def stream_events(agents, name, **arguments) -> list[dict]:
    handle, arguments = _call(agents, name, arguments)
    return list(handle.options(stream=True).run_stream.remote(arguments))


# -- chat template derivation (no Ray) ---------------------------------------------------------------------


def _jinja_renderer(template: str):
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages):
        out = render_jinja_template(
            [messages], chat_template=template, add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="</s>"
        )
        return out[0][0] if isinstance(out, tuple) else out[0]

    return render


QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_derive_chat_template_chatml_matches_sglang_builtin():
    from deployments.models.builtin import CHAT_TEMPLATE

    derived = derive_chat_template(_jinja_renderer(CHAT_TEMPLATE), "tiny-chat")
    chatml = get_chat_template("chatml")
    assert derived.role_prefix_and_suffix == chatml.role_prefix_and_suffix
    assert tuple(derived.stop_str) == tuple(chatml.stop_str)
    assert derived.preamble == "" and derived.default_system_prompt is None


@pytest.mark.parametrize(
    "template, expected",
    [
        (QWEN25, {"user": ("<|im_start|>user\n", "<|im_end|>\n"), "default_system": "You are Qwen, a helpful assistant."}),
        (
            LLAMA3,
            {
                "user": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                "preamble": "<|begin_of_text|>",
                "stop": ("<|eot_id|>",),
            },
        ),
        (GEMMA, {"assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"), "no_system": True}),
    ],
    ids=["qwen2.5-default-system", "llama3-bos", "gemma-no-system"],
)
def test_derive_chat_template_other_families(template, expected):
    render = _jinja_renderer(template)
    derived = derive_chat_template(render, "m")
    for role in ("user", "assistant", "system"):
        if role in expected:
            assert derived.role_prefix_and_suffix[role] == expected[role]
    if "preamble" in expected:
        assert derived.preamble == expected["preamble"]
    if "stop" in expected:
        assert tuple(derived.stop_str) == expected["stop"]
    assert derived.default_system_prompt == expected.get("default_system")
    if expected.get("no_system"):
        with pytest.raises(ChatTemplateError, match="System role not supported"):
            derived.get_prefix_and_suffix("system", [])
    # SGLang's composition reproduces the model's own rendering.
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render_with_template(derived, msgs) == render(msgs)


def test_derive_chat_template_undecomposable_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="cannot decompose the chat template"):
        derive_chat_template(_jinja_renderer(LLAMA2), "llama2")


# -- sampling parameter mapping (no Ray) -----------------------------------------------------------------


class _FakeHandle:
    def options(self, **_):
        return self


def _backend(**kwargs) -> HandleBackend:
    ctx = ModelContext({"model": "m", "max_model_len": 256}, get_chat_template("chatml"))
    return HandleBackend(_FakeHandle(), "sess", context=ctx, **kwargs)


def _params(**overrides) -> SglSamplingParams:
    sp = SglSamplingParams(max_new_tokens=8, stop=[], stop_token_ids=[], stop_regex=[])
    for k, v in overrides.items():
        setattr(sp, k, v)
    return sp


def test_sampling_mapping():
    b = _backend()
    out = b.sampling_kwargs(_params(stop="\n", stop_token_ids=[5], temperature=0.0, top_p=0.9, top_k=-1, ignore_eos=True))
    assert out == {
        "max_tokens": 8, "stop": ["\n"], "stop_token_ids": [5], "temperature": 0.0, "top_p": 0.9, "top_k": 0, "ignore_eos": True,
    }
    assert b.sampling_kwargs(_params(top_k=5))["top_k"] == 5
    for dtype, regex, extra_stop in [
        (int, REGEX_INT, [" ", "\n"]), ("float", REGEX_FLOAT, [" ", "\n"]), (bool, REGEX_BOOL, []), ("str", REGEX_STR, []),
    ]:
        out = b.sampling_kwargs(_params(dtype=dtype, stop=["."]))
        assert out["regex"] == regex and out["stop"] == ["."] + extra_stop
    assert b.sampling_kwargs(_params(regex="[a-z]+"))["regex"] == "[a-z]+"
    schema = json.dumps({"type": "object"})
    assert b.sampling_kwargs(_params(json_schema=schema))["json_schema"] == schema


def test_logit_adjustments_reach_the_base_model():
    # The ones an SGLang program's gen can give (its SglSamplingParams has no repetition_penalty or logit_bias).
    b = _backend()
    got = b.sampling_kwargs(_params(min_new_tokens=2, frequency_penalty=0.5, presence_penalty=-0.5))
    assert {k: got[k] for k in ("min_tokens", "frequency_penalty", "presence_penalty")} == {
        "min_tokens": 2, "frequency_penalty": 0.5, "presence_penalty": -0.5,
    }
    assert "min_p" not in got and "repetition_penalty" not in got
    assert b.sampling_kwargs(_params(min_p=0.1, temperature=0.8))["min_p"] == 0.1


@pytest.mark.parametrize(
    "overrides, feature",
    [
        ({"n": 2}, "n=2"),
        ({"stop_regex": ["a+"]}, "stop_regex"),
        ({"logprob_start_len": 0}, "logprob_start_len"),
        ({"top_logprobs_num": 3}, "top_logprobs_num without return_logprob"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"dtype": int, "regex": "[0-9]"}, "regex together with dtype"),
    ],
)
def test_unsupported_sampling_features_raise(overrides, feature):
    with pytest.raises(UnsupportedFeatureError, match="feature not supported") as e:
        _backend().sampling_kwargs(_params(**overrides))
    assert feature in str(e.value)


def test_bad_sampling_values_raise():
    b = _backend()
    with pytest.raises(ValueError, match="does not fit the model's context of 256"):
        b.sampling_kwargs(_params(max_new_tokens=300))
    with pytest.raises(ValueError, match="dtype must be"):
        b.sampling_kwargs(_params(dtype=list))
    with pytest.raises(ValueError, match="JSON string"):
        b.sampling_kwargs(_params(json_schema={"type": "object"}))
    with pytest.raises(ValueError, match="top_k"):
        b.sampling_kwargs(_params(top_k=-3))
    # As SGLang's server answers (and /generate: tests/test_sglang_wire.py).
    with pytest.raises(ValueError, match="Only one of json_schema, regex, ebnf, or structural_tag"):
        b.sampling_kwargs(_params(regex="[0-9]", json_schema="{}"))


def test_program_signatures():
    names, required = program_arguments(load_program("deployments.programs:self_consistency"))
    assert names == ["question", "num_drafts", "max_tokens", "draft_temperature"] and required == ["question"]

    @sgl.function
    def collides(s, question, temperature=0.5):
        s += question

    with pytest.raises(TypeError, match="temperature"):
        program_arguments(collides)
    with pytest.raises(ValueError, match="package.module:function"):
        load_program("os.system")
    with pytest.raises(TypeError, match="not an @sgl.function"):
        load_program("json:dumps")


def test_errors_pickle():
    import pickle

    for e in (AgentLimitError("max_calls", 3, "x"), AgentProgramError("m:f", "boom", "RuntimeError"), UnsupportedFeatureError("n > 1", "d")):
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is type(e) and str(again) == str(e)


# -- the backend in the driver: real handle, run_batch, streaming, fork, session affinity ---------------------


@sgl.function
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24))


@sgl.function
def four_calls(s, question):
    s += sgl.user(question)
    for i in range(4):
        s += sgl.assistant(sgl.gen(f"a{i}", max_tokens=2, temperature=0))
        s += sgl.user("Again.")


def test_backend_run_batch(model_handle):
    backend = HandleBackend(model_handle, max_calls=10, timeout_s=60)
    assert backend.get_model_name() == "tiny-chat"
    states = qa.run_batch(
        [{"question": "What is the capital of France?"}, {"question": "What color is grass?"}, {"question": "How many days are in a week?"}],
        backend=backend,
        temperature=0,
        num_threads=3,
    )
    assert [st["answer"] for st in states] == [
        "The capital of France is Paris.",
        "Grass is green.",
        "There are seven days in a week.",
    ]
    assert all(st.get_meta_info("answer")["finish_reason"]["type"] == "stop" for st in states)
    assert backend.calls == 3


def test_backend_stream_and_chat_text(model_handle):
    state = qa.run(question="Tell me a story.", backend=HandleBackend(model_handle), temperature=0, stream=True)
    pieces = list(state.text_iter("answer"))
    assert len(pieces) > 1
    assert "".join(pieces) == state["answer"]
    assert state["answer"].startswith("Once upon a time")
    # The prompt was rendered with the model's own chat template (ChatML).
    assert state.text().startswith("<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\nOnce upon")


def test_session_affinity(model_handle):
    """Every call of one run carries the run's session id: the consistent-hash router keeps them on one replica."""
    seen = set()
    for i in range(8):
        backend = HandleBackend(model_handle, session_id=f"affinity-{i}")
        state = four_calls.run(question="Say hello.", backend=backend)
        replicas = {state.get_meta_info(f"a{j}")["replica"] for j in range(4)}
        assert len(replicas) == 1, replicas
        assert {state.get_meta_info(f"a{j}")["session_id"] for j in range(4)} == {f"affinity-{i}"}
        seen |= replicas
    assert len(seen) > 1, "different sessions should use different replicas of the 3"


# -- agent deployments -------------------------------------------------------------------------------------


def test_describe(agents):
    info = agents["consistency"].describe.remote().result()
    assert info["name"] == "self_consistency"
    assert info["program"] == "deployments.programs:self_consistency"
    assert info["arguments"] == ["question", "num_drafts", "max_tokens", "draft_temperature"]
    assert info["required"] == ["question"]
    assert "fork" in info["doc"]
    # Types: `question: str` is annotated, the others follow their defaults.
    assert info["schema"]["properties"] == {
        "question": {"type": "string"},
        "num_drafts": {"type": "integer"},
        "max_tokens": {"type": "integer"},
        "draft_temperature": {"type": "number"},
    }


def test_multi_step_reasoning(agents):
    out = run(agents, "reasoning", question="What is the capital of France?", max_tokens=16, review_tokens=8)
    v = out["variables"]
    assert v["draft"] == "The capital of France is Paris."
    assert set(v) >= {"draft", "review", "answer"}
    assert out["answer"] == v["answer"] and isinstance(out["answer"], str)
    assert out["calls"] == 3
    assert len(out["session_id"]) == 32


def test_safe_response_branches_on_the_check(agents):
    out = run(agents, "safe", question="What color is grass?", max_tokens=16)
    v = out["variables"]
    assert v["draft"] == "Grass is green."
    assert v["verdict"] == "safe"  # the tiny model's verdict for this answer
    assert v["corrected"] == "no" and out["answer"] == v["draft"] == v["answer"]
    assert out["calls"] == 2  # gen + select: no correction

    # An implausible "safe" label makes the check pick "unsafe": the correction branch runs.
    out = run(agents, "safe", question="What color is grass?", max_tokens=16, safe_label="Zqxv-Jkwp")
    v = out["variables"]
    assert v["verdict"] == "unsafe" and v["corrected"] == "yes"
    assert out["calls"] == 3  # gen + select + the corrected answer
    assert out["answer"] == v["answer"] and isinstance(v["answer"], str)


def test_self_consistency(agents):
    out = run(agents, "consistency", question="What color is grass?", num_drafts=3, max_tokens=12, draft_temperature=0.0)
    v = out["variables"]
    assert len(v["draft"]) == 3
    # Greedy drafts agree: one candidate, and the select picks it.
    assert v["candidates"] == ["Grass is green."]
    assert out["answer"] == "Grass is green."
    assert out["calls"] == 4  # 3 forked gens + 1 select

    sampled = run(agents, "consistency", question="Tell me a joke.", num_drafts=2, max_tokens=8, draft_temperature=1.0)
    assert sampled["answer"] in sampled["variables"]["candidates"]


def test_gen_stop_max_tokens_roles_and_fork(agents):
    out = run(agents, "gen-fork", question="Who wrote Romeo and Juliet?", stop=" wrote")
    v = out["variables"]
    short, until_stop = v["out"]
    assert v["answer"] == "William Shakespeare wrote Romeo and Juliet."
    assert v["answer"].startswith(short) and 0 < len(short) < len("William Shakespeare")
    assert until_stop == "William Shakespeare"
    assert v["finish"] == [{"type": "length", "length": 3}, {"type": "stop", "matched": " wrote"}]
    assert out["calls"] == 3
    # Streamed, the forks' gens stream too (generate_stream in the fork threads): same variables.
    *_, final = stream_events(agents, "gen-fork", question="Who wrote Romeo and Juliet?", stop=" wrote")
    assert final["variables"] == v and final["calls"] == 3


def test_select_methods(agents):
    choices = ["Grass is green.", "The capital of France is Paris."]
    out = run(agents, "choose", question="What is the capital of France?", choices=choices)
    assert out["answer"] == "The capital of France is Paris."
    scores = out["variables"]["meta"]["normalized_prompt_logprobs"]
    assert len(scores) == 2 and scores[1] > scores[0]
    # The other methods' deterministic picks for the built-in model.
    picks = {
        method: run(agents, "choose", question="What is the capital of France?", choices=choices, method=method)["answer"]
        for method in ("greedy_token_selection", "unconditional_likelihood_normalized")
    }
    assert picks == {"greedy_token_selection": choices[1], "unconditional_likelihood_normalized": choices[1]}
    # temperature > 0 samples from softmax(score / temperature): at 0.05 "Grass is green." leads by
    # so much (1.91 nats) that the other choice's chance is below 1e-9; at 1e6 both are as likely.
    out = run(agents, "choose", question="What color is grass?", choices=choices, select_temperature=0.05)
    meta = out["variables"]["meta"]
    assert meta["temperature"] == 0.05, meta  # sampled, not the greedy path
    grass, paris = meta["normalized_prompt_logprobs"]
    assert (grass - paris) / 0.05 > 20.8, meta  # exp(-20.8) < 1e-9
    assert out["answer"] == "Grass is green."
    handle, arguments = _call(agents, "choose", {"question": "What color is grass?", "choices": choices, "select_temperature": 1e6})
    sampled = [r.result(timeout_s=120)["answer"] for r in [handle.run.remote(arguments) for _ in range(24)]]
    assert set(sampled) == set(choices), sampled  # all the same: 2 * 2**-24
    with pytest.raises(AgentProgramError, match="select with temperature > 0 and GreedyTokenSelection"):
        run(agents, "choose", question="Hi", choices=choices, method="greedy_token_selection", select_temperature=0.5)


def test_constraints_regex_dtype_json(agents):
    v = run(agents, "constrained")["variables"]
    assert v["number"].strip().lstrip("+-").isdigit()
    import re

    assert re.fullmatch(r"[0-9]{3}-[0-9]{2}", v["code"])
    assert isinstance(json.loads(v["answer"])["ok"], bool)


def test_streaming_per_variable_deltas(agents):
    events = stream_events(agents, "story")
    *deltas, final = events
    assert final["done"] is True
    assert all(set(e) == {"variable", "delta"} for e in deltas)
    by_var: dict[str, list[str]] = {}
    for e in deltas:
        by_var.setdefault(e["variable"], []).append(e["delta"])
    assert list(by_var) == ["first", "answer"]  # in program order
    assert "".join(by_var["first"]) == final["variables"]["first"]
    assert "".join(by_var["answer"]) == final["answer"] == final["variables"]["answer"]
    assert final["variables"]["first"].startswith("Once upon a time")
    assert len(by_var["first"]) > 1, "the first answer arrived in one piece: not streamed"
    assert final["calls"] == 2


def test_argument_errors(agents):
    handle = agents["consistency"]
    with pytest.raises(ValueError, match=r"missing required argument\(s\) \['question'\].*expected arguments"):
        handle.run.remote({}).result()
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['code'\]; expected arguments: \['question'"):
        handle.run.remote({"question": "Hi", "code": "import os"}).result()
    with pytest.raises(ValueError, match="arguments must be an object"):
        handle.run.remote(["Hi"]).result()
    with pytest.raises(ValueError, match="unexpected argument"):
        list(handle.options(stream=True).run_stream.remote({"question": "Hi", "x": 1}))


def test_raising_program_then_next_run_works(agents):
    with pytest.raises(AgentProgramError) as e:
        run(agents, "raising", question="What is 2 + 2?")
    assert e.value.program == "tests.agent_programs:suite"
    assert e.value.error_type == "RuntimeError"
    assert "cannot handle 'What is 2 + 2?'" in str(e.value)
    assert "tests.agent_programs:suite" in str(e.value)
    # The replica is healthy: another program run on it works, streamed too.
    assert run(agents, "choose", question="What color is grass?", choices=["Grass is green.", "Snow is white."])["answer"] == "Grass is green."
    with pytest.raises(AgentProgramError, match="cannot handle 'again'"):
        stream_events(agents, "raising", question="again")


def test_unsupported_feature_in_program(agents):
    with pytest.raises(AgentProgramError, match=r"sampling parameters n=2 .*s\.fork\(2\)"):
        run(agents, "unsupported", question="Hi", feature="n")
    with pytest.raises(AgentProgramError, match="stop_regex"):
        run(agents, "unsupported", question="Hi", feature="stop_regex")


def test_gen_log_probs_reach_meta_info_as_sglang_gives_them():
    b = _backend()
    assert b.sampling_kwargs(_params(return_logprob=True, top_logprobs_num=2))["logprobs"] == 2
    assert b.sampling_kwargs(_params(return_logprob=True))["logprobs"] == 0
    assert "logprobs" not in b.sampling_kwargs(_params())
    entries = [[5, " Paris", -0.25, [[5, " Paris", -0.25], [9, " Rome", -3.0]]]]
    meta = b._logprob_meta(_params(return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True), entries)
    assert meta == {
        "input_token_logprobs": [], "output_token_logprobs": [[-0.25, 5, " Paris"]],
        "input_top_logprobs": [], "output_top_logprobs": [[[-0.25, 5, " Paris"], [-3.0, 9, " Rome"]]],
    }
    assert b._logprob_meta(_params(return_logprob=True), entries) == {
        "input_token_logprobs": [], "output_token_logprobs": [[-0.25, 5, None]],
    }
    assert b._logprob_meta(_params(), entries) == {}


def test_max_calls_limit(agents):
    assert run(agents, "limits", question="Hello!", calls=3)["calls"] == 3
    with pytest.raises(AgentLimitError, match=r"limit of 3 model calls \(max_calls\)") as e:
        run(agents, "limits", question="Hello!", calls=5)
    assert e.value.limit == "max_calls"


def test_timeout_limit(agents):
    started = time.monotonic()
    with pytest.raises(AgentLimitError, match=r"deadline of 1.5 s \(timeout_s\)") as e:
        run(agents, "limits", question="Hello!", calls=3, pause_s=1.0)
    assert e.value.limit == "timeout_s"
    assert time.monotonic() - started < 10
    with pytest.raises(AgentLimitError, match="timeout_s"):
        stream_events(agents, "limits", question="Hello!", calls=3, pause_s=1.0)
    # Still healthy afterwards.
    assert run(agents, "limits", question="Hello!", calls=1)["answer"] == "done"
