"""SGLang's sampling parameters and meta_info mean the same on both of Tandem's SGLang paths: the
gateway's native `/generate` (cluster/sglang_protocol.py) and the agents' HandleBackend
(deployments/agents/backend.py). Both go through deployments/agents/wire.py; each case below runs
through both and must give the same base-model kwargs or the same error. No Ray.
"""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError
from sglang.lang.chat_template import get_chat_template
from sglang.lang.ir import SglSamplingParams
from sglang.srt.sampling.sampling_params import TOP_K_ALL
from sglang.srt.sampling.sampling_params import SamplingParams as ServerSamplingParams

from cluster import sglang_protocol
from cluster.openai_protocol import OpenAIError
from cluster.sglang_protocol import GenerateRequest
from deployments.agents import wire
from deployments.agents.backend import HandleBackend, ModelContext
from deployments.agents.errors import UnsupportedFeatureError
from deployments.engines.engine import SamplingParams, validate_sampling

DEFAULTS = {
    "max_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stop": [], "stop_token_ids": [], "ignore_eos": False,
}
UNSUPPORTED_PREFIX = "SGLang sampling parameters not supported by Tandem: "
BACKEND_PREFIX = "SGLang feature not supported by Tandem's HandleBackend: sampling parameters "


def ok(**changes) -> dict:
    return {**DEFAULTS, **changes}


def invalid(message: str) -> tuple[str, str]:
    return ("invalid", message)


def unsupported(feature: str) -> tuple[str, str]:
    return ("unsupported", feature)


# (SGLang sampling parameters, the base model's kwargs or the error, SGLang's server agrees: its
# SamplingParams(**params).verify() rejects exactly the "invalid" cases, with the same message).
CASES = {
    "defaults": ({}, ok(), True),
    "max_new_tokens=None": (
        {"max_new_tokens": None},
        unsupported("max_new_tokens=None (SGLang: as many tokens as the context allows; give a number)"), True,
    ),
    "max_new_tokens=0": ({"max_new_tokens": 0}, unsupported("max_new_tokens=0 (prefill only, nothing to generate)"), True),
    "max_new_tokens=5": ({"max_new_tokens": 5}, ok(max_tokens=5), True),
    "max_new_tokens=-1": ({"max_new_tokens": -1}, invalid("max_new_tokens must be at least 0, got -1."), True),
    "max_new_tokens=1.5": ({"max_new_tokens": 1.5}, invalid("max_new_tokens must be an integer, got 1.5"), False),
    "top_k=-1": ({"top_k": -1}, ok(top_k=0), True),
    "top_k=-5": ({"top_k": -5}, invalid("top_k must be -1 (disable) or at least 1, got -5."), True),
    "top_k=0": ({"top_k": 0}, invalid("top_k must be -1 (disable) or at least 1, got 0."), True),
    "top_k=3": ({"top_k": 3}, ok(top_k=3), True),
    "top_k=None": ({"top_k": None}, ok(), True),
    "temperature=0": ({"temperature": 0}, ok(temperature=0.0), True),
    "temperature=0 top_k=3": ({"temperature": 0.0, "top_k": 3}, ok(temperature=0.0, top_k=0), True),
    "temperature=0 top_k=-5": ({"temperature": 0.0, "top_k": -5}, ok(temperature=0.0, top_k=0), True),
    "temperature=1e-7": ({"temperature": 1e-7}, ok(temperature=0.0), True),
    "temperature=0.7": ({"temperature": 0.7, "top_p": 0.9}, ok(temperature=0.7, top_p=0.9), True),
    "temperature=None": ({"temperature": None}, ok(), True),
    "temperature=-0.5": ({"temperature": -0.5}, invalid("temperature must be a non-negative finite number, got -0.5."), True),
    "top_p=0": ({"top_p": 0}, invalid("top_p must be in (0, 1], got 0."), True),
    "stop str": ({"stop": "\n"}, ok(stop=["\n"]), True),
    "stop list": ({"stop": ["a", "b", "a"]}, ok(stop=["a", "b"]), True),
    "stop empty list": ({"stop": []}, ok(), True),
    "stop empty string": ({"stop": [""]}, invalid("stop strings must not be empty"), False),
    "stop 33": ({"stop": [str(i) for i in range(33)]}, invalid("at most 32 stop strings are allowed, got 33"), False),
    "stop_token_ids": ({"stop_token_ids": [5, 7, 5]}, ok(stop_token_ids=[5, 7]), True),
    "stop_token_ids negative": (
        {"stop_token_ids": [-1]}, invalid("stop_token_ids must be token ids (integers >= 0), got [-1]"), False,
    ),
    "ignore_eos": ({"ignore_eos": True}, ok(ignore_eos=True), True),
    "ignore_eos not bool": ({"ignore_eos": "yes"}, invalid("ignore_eos must be a boolean, got 'yes'"), False),
    "frequency_penalty": ({"frequency_penalty": 0.5}, ok(frequency_penalty=0.5), True),
    "presence_penalty": ({"presence_penalty": -0.5}, ok(presence_penalty=-0.5), True),
    "frequency_penalty out of range": (
        {"frequency_penalty": 3}, invalid("frequency_penalty must be in [-2, 2], got 3."), True,
    ),
    "min_p": ({"min_p": 0.1, "temperature": 0.7}, ok(min_p=0.1, temperature=0.7, top_k=0), True),
    "min_p greedy": ({"min_p": 0.1, "temperature": 0}, ok(temperature=0.0), True),  # greedy keeps the top token anyway
    "min_new_tokens": ({"min_new_tokens": 2}, ok(min_tokens=2), True),
    "min_new_tokens > max": (
        {"max_new_tokens": 5, "min_new_tokens": 9},
        invalid("min_new_tokens must be in [0, max_new_tokens(5)], got 9."), True,
    ),
    "n=2": ({"n": 2}, unsupported("n=2 (one sample per request: send 2 requests; in an SGLang program, s.fork(2))"), True),
    "stop_regex": ({"stop_regex": "a+"}, unsupported("stop_regex=['a+'] (use stop strings)"), True),
    "several unsupported": (
        {"stop_regex": "a+", "n": 2, "max_new_tokens": None},
        unsupported(
            "max_new_tokens=None (SGLang: as many tokens as the context allows; give a number); "
            "n=2 (one sample per request: send 2 requests; in an SGLang program, s.fork(2)); stop_regex=['a+'] (use stop strings)"
        ),
        True,
    ),
    "regex": ({"regex": "[a-z]+"}, ok(regex="[a-z]+"), True),
    "regex empty is unset": ({"regex": ""}, ok(), True),
    "json_schema": ({"json_schema": '{"type": "object"}'}, ok(json_schema='{"type": "object"}'), True),
    "regex and json_schema": (
        {"regex": "[a-z]+", "json_schema": '{"type": "object"}'},
        invalid("Only one of json_schema, regex, ebnf, or structural_tag can be set."), True,
    ),
    "json_schema not JSON": (
        {"json_schema": "{"},
        invalid("json_schema is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        False,
    ),
    "json_schema a dict": (
        {"json_schema": {"type": "object"}},
        invalid("json_schema must be a JSON schema as a JSON string (json.dumps(schema)), got dict"), False,
    ),
}


class _FakeHandle:
    def options(self, **_):
        return self


BACKEND = HandleBackend(_FakeHandle(), "sess", context=ModelContext({"model": "m"}, get_chat_template("chatml")))


def via_generate(params: dict):
    """`/generate`: the request model checks the values, to_tandem maps (as the gateway calls them)."""
    try:
        return GenerateRequest(text="x", sampling_params=params).sampling_params.to_tandem()
    except ValidationError as e:
        err = e.errors()[0]
        assert err["loc"] == ("sampling_params",) and err["type"] == "value_error"
        return invalid(err["msg"].removeprefix("Value error, "))
    except OpenAIError as e:
        assert e.status == 400 and e.message.startswith(UNSUPPORTED_PREFIX), e.message
        assert e.param.removeprefix("sampling_params.") in params
        return unsupported(e.message.removeprefix(UNSUPPORTED_PREFIX))


def via_backend(params: dict):
    """The agents' HandleBackend, with the parameters as an SGLang program's gen gives them."""
    try:
        return BACKEND.sampling_kwargs(SglSamplingParams(**params))
    except UnsupportedFeatureError as e:
        assert str(e).startswith(BACKEND_PREFIX), str(e)
        return unsupported(str(e).removeprefix(BACKEND_PREFIX))
    except ValueError as e:
        assert isinstance(e, wire.SamplingParamError)
        return invalid(str(e))


@pytest.mark.parametrize("params, expected", [(p, e) for p, e, _ in CASES.values()], ids=list(CASES))
def test_both_paths_map_alike(params, expected):
    assert via_generate(params) == expected
    assert via_backend(params) == expected


@pytest.mark.parametrize(
    "params, expected", [(p, e) for p, e, same in CASES.values() if same], ids=[k for k, v in CASES.items() if v[2]]
)
def test_invalid_exactly_where_sglang_rejects(params, expected):
    sglang = ServerSamplingParams(**params)
    if isinstance(expected, tuple) and expected[0] == "invalid":
        with pytest.raises(ValueError) as e:
            sglang.verify(vocab_size=1000)
        assert str(e.value) == expected[1]
    else:
        sglang.verify(vocab_size=1000)  # SGLang serves it; Tandem either maps it or names what it cannot


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"sampling_seed": 7}, ok(seed=7)),
        ({"sampling_seed": "7"}, invalid("sampling_seed must be an integer, got str.")),
        ({"repetition_penalty": 1.2}, ok(repetition_penalty=1.2)),
        ({"repetition_penalty": 0}, invalid("repetition_penalty must be in (0, 2] (1.0 = no penalty), got 0.")),
        ({"beam_width": 1}, ok()),
        ({"beam_width": 4}, unsupported("beam_width=4")),
        ({"ebnf": "root ::= 'a'"}, unsupported("ebnf=\"root ::= 'a'\" (use regex or json_schema)")),
        ({"structural_tag": ""}, ok()),
        ({"skip_special_tokens": False}, unsupported("skip_special_tokens=False")),
        ({"spaces_between_special_tokens": False}, unsupported("spaces_between_special_tokens=False")),
        ({"skip_special_tokens": True, "spaces_between_special_tokens": True}, ok()),  # what RuntimeEndpoint sends
        ({"no_stop_trim": True}, unsupported("no_stop_trim=True")),
        ({"stream_interval": 4}, unsupported("stream_interval=4 (the deployment's stream_interval_ms applies)")),
        ({"logit_bias": {"5": 1.0}}, ok(logit_bias={5: 1.0})),
        ({"logit_bias": {"five": 1.0}}, invalid("logit_bias keys must be token ids, got 'five'")),
        ({"logit_bias": {}}, ok()),
        ({"custom_params": {"a": 1}}, unsupported("custom_params={'a': 1}")),
        ({"watermark": {"key": 1}}, unsupported("watermark={'key': 1}")),
    ],
)
def test_server_only_parameters_on_generate(params, expected):
    """Parameters of SGLang's server that SglSamplingParams (the frontend's gen) has no field for."""
    assert via_generate(params) == expected


def test_every_mapping_is_valid_base_model_sampling():
    mapped = [e for _, e, _ in CASES.values() if isinstance(e, dict)] + [wire.to_tandem({"sampling_seed": 7})]
    for kwargs in mapped:
        validate_sampling(SamplingParams(**kwargs), vocab_size=1000)


def test_unknown_parameter_is_a_400_naming_it():
    with pytest.raises(ValidationError) as e:
        GenerateRequest(text="x", sampling_params={"max_tokens": 4})
    assert e.value.errors()[0]["loc"] == ("sampling_params", "max_tokens") and e.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(wire.SamplingParamError, match=r"^unknown SGLang sampling parameter\(s\): max_tokens$"):
        wire.to_tandem({"max_tokens": 4})


def test_names_and_defaults_are_sglang_servers():
    fields = dict(zip(ServerSamplingParams.__struct_fields__, ServerSamplingParams.__struct_defaults__))
    # The API fields come first; the rest SGLang fills in itself (stop_strs, ..., is_normalized).
    api = {k: fields[k] for k in list(fields)[: list(fields).index("stop_strs")]}
    assert api == {**wire.SAMPLING_DEFAULTS, "top_k": TOP_K_ALL}
    # What the frontend sends (RuntimeEndpoint posts to_srt_kwargs()) is a subset, with the same defaults.
    srt = SglSamplingParams().to_srt_kwargs()
    assert set(srt) <= set(wire.SAMPLING_DEFAULTS)
    assert {k: v for k, v in srt.items() if v != ()} == {
        k: wire.SAMPLING_DEFAULTS[k] for k in srt if srt[k] != ()
    }
    assert wire.normalize(wire.normalize({"stop": "a", "temperature": None})) == wire.normalize({"stop": ["a"]})


def test_errors_cross_process_boundaries():
    for e in (wire.SamplingParamError("top_k", "bad top_k"), wire.UnsupportedSamplingError({"n": 2, "stop_regex": ["a"]})):
        again = pickle.loads(pickle.dumps(e))
        assert (type(again), str(again), again.param) == (type(e), str(e), e.param)
    assert wire.UnsupportedSamplingError({"n": 2, "stop_regex": ["a"]}).params == ["n", "stop_regex"]


# -- meta_info -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason, stop_reason, finish",
    [
        ("stop", "\n", {"type": "stop", "matched": "\n"}),
        ("stop", 2, {"type": "stop", "matched": 2}),
        ("length", None, {"type": "length", "length": 4}),
        ("abort", None, {"type": "abort", "message": "the base model aborted the request", "status_code": None, "err_type": None}),
        (None, None, None),
    ],
)
def test_meta_info_is_rendered_alike(reason, stop_reason, finish):
    assert sglang_protocol.finish_reason(reason, stop_reason, 4) == finish
    expected = {"id": "sess-3", "finish_reason": finish, "prompt_tokens": 9, "completion_tokens": 4, "cached_tokens": 0}
    assert sglang_protocol.meta_info("sess-3", 9, 4, sglang_protocol.finish_reason(reason, stop_reason, 4)) == expected
    # The backend: a complete() result (counts under usage, with the replica) and a streamed delta.
    completed = {"text": "t", "finish_reason": reason, "stop_reason": stop_reason, "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    assert BACKEND._meta(completed, 3, "sess-3", "r1") == {**expected, "session_id": "sess", "call": 3, "replica": "r1"}
    delta = {"text": "t", "finish_reason": reason, "stop_reason": stop_reason, "prompt_tokens": 9, "completion_tokens": 4}
    assert BACKEND._meta(delta, 3, "sess-3") == {**expected, "session_id": "sess", "call": 3}
