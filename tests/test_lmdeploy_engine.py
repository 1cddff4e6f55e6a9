"""The LMDeploy adapters (`deployments/engines/lmdeploy_engine.py`, `lmdeploy_config.py`) against the real installed lmdeploy, on CPU.

What runs for real here: LMDeploy's config dataclasses and their checks, its GenerationConfig, its xgrammar
response_format check, its output types (GenOut, Response, EngineOutput) and its whole serving layer
(`AsyncEngine`: preprocess, generate, safe_run's abort, session and request-handle bookkeeping, get_logits).
What does not: the accelerator-bound engine core (TurboMind / the PyTorch engine). Tests that drive the adapter
end to end replace that core with `ReplacedCore` below (their names say so): it plays back scripted tokens as
real `EngineOutput`s and records the abort calls LMDeploy makes. No hardware is exercised except by the opt-in
`gpu` test at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import zlib

import pytest
import torch
from lmdeploy.messages import (
    EngineOutput,
    GenerationConfig,
    PytorchEngineConfig,
    QuantPolicy,
    Response,
    ResponseType,
    ScheduleMetrics,
    TurbomindEngineConfig,
)
from lmdeploy.serve.core import AsyncEngine
from lmdeploy.serve.core.async_engine import GenOut
from transformers import AutoTokenizer

from deployments.models.builtin import resolve_model_source
from deployments.engines.engine import EngineError, GenerationRequest, PromptTooLongError, SamplingParams
from deployments.engines.registry import engine_args_checker, pick_engine
from deployments.engines.lmdeploy_config import (
    build_engine_config,
    check_pytorch_args,
    check_turbomind_args,
    generation_config,
    turbomind_supports,
)
from deployments.engines.lmdeploy_engine import LMDeployPytorchEngine, TurbomindEngine, delta_from_output
from deployments.engines.text import DeltaMapper

QWEN2_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 28, "num_key_value_heads": 4}
ANSWER = "7 * 6 = 42."


def request(prompt=None, ids=None, **sampling) -> GenerationRequest:
    return GenerationRequest("t", SamplingParams(**sampling), prompt=prompt, prompt_token_ids=ids)


# -- engine_args -> LMDeploy engine configs -----------------------------------------------------


def test_turbomind_config_from_engine_args():
    args = {
        "quant_policy": 8,
        "model_format": "awq",
        "cache_max_entry_count": 0.5,
        "session_len": 8192,
        "enable_prefix_caching": True,
        "max_batch_size": 64,
    }
    config = build_engine_config("turbomind", args, device_count=2)
    assert isinstance(config, TurbomindEngineConfig)
    assert config.tp == 2
    assert config.quant_policy == QuantPolicy.INT8
    assert (config.model_format, config.cache_max_entry_count, config.session_len) == ("awq", 0.5, 8192)
    assert config.enable_prefix_caching and config.max_batch_size == 64
    assert config.language_model_only  # Tandem's default: text only


def test_turbomind_defaults_keep_all_token_logits_available():
    config = build_engine_config("turbomind", {}, 1)
    assert (config.tp, config.quant_policy, config.enable_prefix_caching) == (1, QuantPolicy.NONE, False)


def test_pytorch_config_forces_ascend():
    config = build_engine_config("pytorch", {"quant_policy": 4, "session_len": 4096, "block_size": 128}, 4)
    assert isinstance(config, PytorchEngineConfig)
    assert (config.device_type, config.tp) == ("ascend", 4)
    assert config.quant_policy == QuantPolicy.INT4
    assert (config.session_len, config.block_size) == (4096, 128)
    assert config.enable_prefix_caching and config.logprobs_mode == "raw_logprobs"


def test_enum_fields_accept_plain_values():
    from lmdeploy.pytorch.disagg.config import EngineRole

    assert build_engine_config("pytorch", {"role": 1}, 1).role is EngineRole.Hybrid


@pytest.mark.parametrize(
    "backend, args, device_count, message",
    [
        ("turbomind", {"tp": 2}, 1, r"engine_args\.tp cannot be set .*tp=2 with accelerator\.count=1.*set that"),
        ("pytorch", {"tp": 4}, 4, r"engine_args\.tp .*accelerator\.count"),
        ("turbomind", {"devices": [0, 1]}, 2, r"engine_args\.devices cannot be set"),
        ("turbomind", {"dp": 2}, 1, r"engine_args\.dp .*replicas"),
        ("pytorch", {"device_type": "cuda"}, 1, r"engine_args\.device_type .*ascend.*turbomind"),
        ("turbomind", {"session_len": "long"}, 1, r"engine_args\.session_len must be int \| None, got 'long'"),
        ("turbomind", {"enable_prefix_caching": "yes"}, 1, r"engine_args\.enable_prefix_caching must be bool"),
        ("pytorch", {"session_len": 1.5}, 1, r"engine_args\.session_len must be int"),
        ("turbomind", {"max_batch_size": 0}, 1, r"engine_args\.max_batch_size must be a positive integer, got 0"),
        ("turbomind", {"quant_policy": 16}, 1, r"engine_args\.quant_policy .*\[0, 4, 8, 42\].*got 16"),
        ("turbomind", {"quant_policy": 3}, 1, r"engine_args\.quant_policy"),
        ("pytorch", {"quant_policy": 5}, 1, r"engine_args\.quant_policy must be one of \[0, 4, 8, 16, 17, 42\]"),
        ("turbomind", {"model_format": "gguf"}, 1, r"engine_args\.model_format .*'awq', 'gptq'.*got 'gguf'"),
        ("pytorch", {"model_format": "awq"}, 1, r"engine_args\.model_format must be one of \[None, 'fp8'\]"),
        ("turbomind", {"dtype": "float32"}, 1, r"engine_args\.dtype must be one of \['auto', 'float16', 'bfloat16'\]"),
        ("pytorch", {"cache_max_entry_count": 1.5}, 1, r"engine_args\.cache_max_entry_count .*\(0, 1\).*1\.5"),
        ("turbomind", {"cache_max_entry_count": 0}, 1, r"engine_args\.cache_max_entry_count must be > 0"),
        ("pytorch", {"logprobs_mode": "raw_logits"}, 1, r"engine_args\.logprobs_mode must be 'raw_logprobs'"),
        # Checks only LMDeploy's own __post_init__ makes, reported with its message.
        ("turbomind", {"cache_prompt": "never"}, 1, r"rejected by LMDeploy's TurbomindEngineConfig: .*cache_prompt"),
        ("pytorch", {"block_size": 24}, 1, r"rejected by LMDeploy's PytorchEngineConfig: .*power of 2.*24"),
        ("turbomind", {}, 0, r"accelerator\.count must be a positive integer, got 0"),
    ],
)
def test_bad_engine_args_name_the_field(backend, args, device_count, message):
    with pytest.raises(ValueError, match=message):
        build_engine_config(backend, args, device_count)


def test_unknown_engine_arg_lists_fields_and_suggests_the_closest():
    with pytest.raises(ValueError) as info:
        build_engine_config("turbomind", {"cache_max_entry": 0.5}, 1)
    message = str(info.value)
    assert "unknown engine_args key 'cache_max_entry'" in message
    assert "Did you mean 'cache_max_entry_count'?" in message
    assert "'session_len'" in message and "'quant_policy'" in message
    assert "'tp'" not in message.split("Allowed:")[1]  # the deployment sets tp

    with pytest.raises(ValueError, match=r"unknown engine_args key 'max_num_seqs' .*PytorchEngineConfig"):
        build_engine_config("pytorch", {"max_num_seqs": 8}, 1)


@pytest.mark.parametrize("check", [check_turbomind_args, check_pytorch_args])
def test_tp_checks(check):
    check({}, 1, None)
    check({}, 4, QWEN2_CONFIG)
    check({}, 8, {"num_attention_heads": 32, "num_key_value_heads": 2})  # KV heads replicated up to tp
    with pytest.raises(ValueError, match=r"accelerator\.count=3 .*power of two"):
        check({}, 3, None)
    with pytest.raises(ValueError, match=r"accelerator\.count=8 does not divide the model's num_attention_heads=28"):
        check({}, 8, QWEN2_CONFIG)
    with pytest.raises(ValueError, match=r"num_key_value_heads=6"):
        check({}, 4, {"num_attention_heads": 12, "num_key_value_heads": 6})
    # VL checkpoints nest the language model's config.
    with pytest.raises(ValueError, match=r"num_attention_heads=12"):
        check({}, 8, {"vision_config": {"num_attention_heads": 16}, "text_config": {"num_attention_heads": 12}})
    with pytest.raises(ValueError, match=r"engine_args\.tp"):
        check({"tp": 2}, 2, None)


def test_check_turbomind_args_knows_the_model():
    with pytest.raises(ValueError, match=r"TurboMind does not support .*'GPT2LMHeadModel'.*lmdeploy-pytorch"):
        check_turbomind_args({}, 1, {"architectures": ["GPT2LMHeadModel"], "num_attention_heads": 12})
    gptq = {**QWEN2_CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    check_turbomind_args({}, 1, gptq)
    check_turbomind_args({"model_format": "gptq"}, 1, gptq)
    with pytest.raises(ValueError, match=r"model_format='awq' contradicts .*quant_method='gptq'"):
        check_turbomind_args({"model_format": "awq"}, 1, gptq)


def test_registry_finds_the_checkers():
    assert engine_args_checker("turbomind") is check_turbomind_args
    assert engine_args_checker("lmdeploy-pytorch") is check_pytorch_args
    # `engine: auto` on a GPU asks lmdeploy_config's supports hook.
    assert pick_engine("gpu", QWEN2_CONFIG, "some/model") == "turbomind"
    assert pick_engine("gpu", {"architectures": ["GPT2LMHeadModel"]}, "some/model") == "sglang"


def test_turbomind_supports():
    for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "InternLM2ForCausalLM"):
        assert turbomind_supports(arch), arch
    for arch in ("GPT2LMHeadModel", "Qwen2ForCausalLMX", ""):
        assert not turbomind_supports(arch), arch


# -- SamplingParams -> GenerationConfig ---------------------------------------------------------


def test_greedy_generation_config():
    config = generation_config(SamplingParams(max_tokens=7, temperature=0, top_p=0.5, top_k=40))
    assert isinstance(config, GenerationConfig)
    assert config.max_new_tokens == 7
    assert (config.do_sample, config.top_k, config.temperature, config.top_p) == (False, 1, 1.0, 1.0)
    assert config.response_format is None and config.stop_words is None and config.stop_token_ids is None
    assert config.include_stop_str_in_output and config.skip_special_tokens


def test_seeded_sampling_generation_config():
    config = generation_config(SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, top_k=20, seed=1234))
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.random_seed) == (
        True, 0.7, 0.9, 20, 1234)
    unseeded = generation_config(SamplingParams(temperature=1.0))
    assert unseeded.random_seed is None and unseeded.top_k == 0  # 0: top-k disabled


def test_stops_generation_config():
    config = generation_config(SamplingParams(stop=["\n\n", "END"], stop_token_ids=[7, 9]))
    assert (config.stop_words, config.stop_token_ids, config.ignore_eos) == (["\n\n", "END"], [7, 9], False)
    # With ignore_eos LMDeploy would drop or ban them: the adapter stops on them itself.
    config = generation_config(SamplingParams(stop=["END"], stop_token_ids=[7], ignore_eos=True))
    assert (config.stop_words, config.stop_token_ids, config.ignore_eos) == (None, None, True)


def test_regex_response_format():
    from lmdeploy._guided_decoding import ensure_response_format_compilable

    config = generation_config(SamplingParams(regex=r"(yes|no)[.!]"))
    assert config.response_format == {"type": "regex_schema", "regex_schema": r"(yes|no)[.!]"}
    ensure_response_format_compilable(config.response_format)  # LMDeploy's own xgrammar check


def test_json_schema_response_format():
    from lmdeploy._guided_decoding import ensure_response_format_compilable

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    config = generation_config(SamplingParams(json_schema=json.dumps(schema)))
    assert config.response_format == {"type": "json_schema", "json_schema": {"name": "tandem", "schema": schema}}
    ensure_response_format_compilable(config.response_format)


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(temperature=2.5), r"temperature must be in \[0, 2\.0\]"),
        (dict(temperature=-1), r"temperature"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k"),
        (dict(max_tokens=0), r"max_tokens"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(stop=[""]), r"stop must be a list of non-empty strings"),
        (dict(stop_token_ids=[-3]), r"stop_token_ids"),
        (dict(regex="a", json_schema="{}"), r"at most one of regex and json_schema"),
        (dict(json_schema="{not json"), r"json_schema is not valid JSON"),
        (dict(json_schema="[1]"), r"json_schema must be a JSON object"),
    ],
)
def test_bad_sampling_is_a_value_error(sampling, message):
    with pytest.raises(ValueError, match=message):
        generation_config(SamplingParams(**sampling))


# -- LMDeploy outputs -> Deltas -----------------------------------------------------------------


def gen_outs(tokenizer, prompt_len: int, ids: list[int], finish: str, final_ids=(), start=0) -> list[GenOut]:
    """What AsyncEngine.generate yields: one GenOut per new token (running generate_token_len), then the last one
    (which carries the stop token under include_stop_str_in_output)."""
    outs = [
        GenOut(tokenizer.decode([t]), prompt_len, start + i + 1, None, token_ids=[t]) for i, t in enumerate(ids)
    ]
    total = start + len(ids) + len(final_ids)
    outs.append(GenOut("", prompt_len, total, finish, token_ids=list(final_ids)))
    return outs


def map_all(mapper: DeltaMapper, outputs) -> list:
    deltas = []
    for output in outputs:
        delta = delta_from_output(mapper, output)
        if delta is not None:
            deltas.append(delta)
        if delta is not None and delta.finish_reason is not None:
            break
    return deltas


def test_deltas_for_an_eos_stop(tokenizer):
    ids = tokenizer.encode(ANSWER)
    mapper = DeltaMapper(tokenizer, SamplingParams(), [1, 2, 3])
    deltas = map_all(mapper, gen_outs(tokenizer, 3, ids, "stop", final_ids=[tokenizer.eos_token_id]))
    assert "".join(d.text for d in deltas) == ANSWER
    assert [t for d in deltas for t in d.token_ids] == ids + [tokenizer.eos_token_id]
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", None)
    assert (last.prompt_tokens, last.completion_tokens) == (3, len(ids) + 1)  # the EOS counts, its text does not
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert [d.completion_tokens for d in deltas[:-1]] == list(range(1, len(ids) + 1))


def test_deltas_for_length_and_abort(tokenizer):
    ids = tokenizer.encode(ANSWER)[:4]
    for finish in ("length", "abort"):
        deltas = map_all(DeltaMapper(tokenizer, SamplingParams(), [5]), gen_outs(tokenizer, 1, ids, finish))
        assert "".join(d.text for d in deltas) == tokenizer.decode(ids)
        assert (deltas[-1].finish_reason, deltas[-1].stop_reason, deltas[-1].completion_tokens) == (finish, None, 4)


def test_deltas_for_a_requested_stop_token(tokenizer):
    ids = tokenizer.encode(ANSWER)
    stop_id = ids[4]  # " =" : the engine stops on it and sends it last
    mapper = DeltaMapper(tokenizer, SamplingParams(stop_token_ids=[stop_id]), [1])
    deltas = map_all(mapper, gen_outs(tokenizer, 1, ids[:4], "stop", final_ids=[stop_id]))
    assert "".join(d.text for d in deltas) == "7 * 6"
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason, deltas[-1].completion_tokens) == ("stop", stop_id, 5)


def test_deltas_for_a_stop_string_across_tokens(tokenizer):
    ids = tokenizer.encode(ANSWER)
    mapper = DeltaMapper(tokenizer, SamplingParams(stop=["6 = 4"]), [1])
    deltas = map_all(mapper, gen_outs(tokenizer, 1, ids, "stop", final_ids=[tokenizer.eos_token_id]))
    assert "".join(d.text for d in deltas) == "7 * "
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", "6 = 4")
    assert last.completion_tokens == 7 and mapper.finished  # ended at " 4": the caller aborts the rest
    assert not any("6" in d.text for d in deltas)  # never streamed a piece of the stop string


def test_deltas_for_a_stop_word_lmdeploy_stopped_on(tokenizer):
    # LMDeploy turns stop_words into ids of tokens containing them and sends that token last.
    ids = tokenizer.encode(ANSWER)
    mapper = DeltaMapper(tokenizer, SamplingParams(stop=["="]), [1])
    deltas = map_all(mapper, gen_outs(tokenizer, 1, ids[:4], "stop", final_ids=[ids[4]]))
    assert "".join(d.text for d in deltas) == "7 * 6 "
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason, deltas[-1].completion_tokens) == ("stop", "=", 5)


def test_deltas_cut_a_stop_token_inside_a_step_under_ignore_eos(tokenizer):
    ids = tokenizer.encode(ANSWER)
    mapper = DeltaMapper(tokenizer, SamplingParams(stop_token_ids=[ids[4]], ignore_eos=True), [1])
    first = delta_from_output(mapper, GenOut("", 1, 3, None, token_ids=ids[:3]))
    delta = delta_from_output(mapper, GenOut("", 1, 7, None, token_ids=ids[3:7]))  # " =" arrives mid-step
    assert first.text + delta.text == "7 * 6"
    assert (delta.token_ids, delta.completion_tokens) == (ids[3:5], 5)
    assert (delta.finish_reason, delta.stop_reason) == ("stop", ids[4])


def test_deltas_never_split_a_utf8_character(tokenizer):
    answer = "从前有一只小猫，它住在山脚下的村子里。"
    ids = tokenizer.encode(answer)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some tokens hold part of a character
    deltas = map_all(DeltaMapper(tokenizer, SamplingParams(), [1]), gen_outs(tokenizer, 1, ids, "length"))
    assert "".join(d.text for d in deltas) == answer
    assert not any("\ufffd" in d.text for d in deltas)


def test_deltas_from_pipeline_responses(tokenizer):
    ids = tokenizer.encode(ANSWER)
    outputs = [out.to_response() for out in gen_outs(tokenizer, 2, ids, "stop", final_ids=[tokenizer.eos_token_id])]
    assert isinstance(outputs[0], Response)
    deltas = map_all(DeltaMapper(tokenizer, SamplingParams(), [1, 2]), outputs)
    assert "".join(d.text for d in deltas) == ANSWER and deltas[-1].finish_reason == "stop"


def test_error_output_is_an_engine_error(tokenizer):
    with pytest.raises(EngineError, match="LMDeploy failed the request"):
        delta_from_output(DeltaMapper(tokenizer, SamplingParams(), [1]), GenOut("", 1, 0, "error", token_ids=[]))


# -- the adapters, with the accelerator-bound engine core replaced ------------------------------


def fake_logits(prefix: tuple[int, ...], vocab: int) -> torch.Tensor:
    """Deterministic next-token logits for a prefix (what the model would return at its last position)."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr(prefix).encode()))
    return torch.randn(vocab, generator=generator)


class ReplacedCore:
    """Stands in for the accelerator-bound core (`lmdeploy.turbomind.TurboMind` / the PyTorch `Engine`): the
    methods LMDeploy's AsyncEngine calls, real `EngineOutput`s out. Generation plays back `script` (then `filler`
    forever), one token per step; every abort LMDeploy sends is recorded. No model runs."""

    def __init__(self, engine_config, script=(), filler=None, vocab=894, step_s=0.001):
        engine_config.max_batch_size = engine_config.max_batch_size or 4  # as the real cores resolve it
        self.engine_config = engine_config
        self.script, self.filler, self.vocab, self.step_s = list(script), filler, vocab, step_s
        self.requests: list[tuple[int, list[int], GenerationConfig]] = []
        self.cancelled: list[int] = []
        self.metrics = ScheduleMetrics(active_seqs=3, waiting_seqs=2, cache_usage=0.25)
        self.alive = True
        self.closed = False

    def create_instance(self, cuda_stream_id=0):
        return ReplacedInstance(self)

    def get_schedule_metrics(self):
        return self.metrics

    async def get_health_status(self):
        message = "replaced core" if self.alive else "replaced core reports its loop dead"
        return dict(alive=self.alive, message=message, schedule_metrics=self.metrics if self.alive else None)

    def close(self):
        self.closed = True

    def logits(self, ids: list[int]) -> torch.Tensor:
        return torch.stack([fake_logits(tuple(ids[: i + 1]), self.vocab) for i in range(len(ids))])


class ReplacedInstance:
    """One request handle of `ReplacedCore` (what `create_instance` returns to LMDeploy's handle pool)."""

    def __init__(self, core: ReplacedCore):
        self.core = core
        self._cancel_requested: set[int] = set()

    async def async_cancel(self, session_id=None):
        self.core.cancelled.append(session_id)
        self._cancel_requested.add(session_id)

    async def async_end(self, session_id):
        return None

    async def async_stream_infer(self, session_id, input_ids, gen_config=None, stream_output=False, **kwargs):
        core = self.core
        core.requests.append((session_id, list(input_ids), gen_config))
        if gen_config.output_logits == "all":  # AsyncEngine.async_get_logits (TurboMind scoring)
            yield EngineOutput(ResponseType.FINISH, [0], logits=core.logits(list(input_ids)))
            return
        if gen_config.logprob_start_len >= 0:  # a PyTorch-engine scoring-only request
            log_probs = torch.log_softmax(core.logits(list(input_ids)), dim=-1)
            rows = [{t: log_probs[i - 1, t].item()} for i, t in enumerate(input_ids) if i >= 1]
            yield EngineOutput(ResponseType.FINISH, [], logprobs=rows)
            return
        stop_ids = set() if gen_config.ignore_eos else set(gen_config.stop_token_ids or [])
        tokens = itertools.chain(core.script, itertools.repeat(core.filler))
        for step, token in zip(range(1, gen_config.max_new_tokens + 1), tokens):
            await asyncio.sleep(core.step_s)  # one decode step
            if session_id in self._cancel_requested:
                yield EngineOutput(ResponseType.CANCEL, [])
                return
            done = token in stop_ids or step == gen_config.max_new_tokens
            yield EngineOutput(ResponseType.FINISH if done else ResponseType.SUCCESS, [token])
            if done:
                return


@pytest.fixture
def replace_core(monkeypatch):
    """Makes LMDeploy's AsyncEngine build a `ReplacedCore` instead of TurboMind / the PyTorch engine."""
    cores: list[ReplacedCore] = []

    def install(**core_kwargs):
        def build(self, model_path, backend_config, **kwargs):
            cores.append(ReplacedCore(backend_config, **core_kwargs))
            return cores[-1]

        monkeypatch.setattr(AsyncEngine, "_build_turbomind", build)
        monkeypatch.setattr(AsyncEngine, "_build_pytorch", build)
        return cores

    return install


async def started(engine_class, model_path, tokenizer, engine_args=None):
    engine = engine_class(model_path, dict(engine_args or {"session_len": 256}), tokenizer=tokenizer)
    await engine.start()
    return engine


def assert_released(engine) -> None:
    """LMDeploy handed the request handle back and forgot the session; the adapter counts nothing in flight."""
    lmdeploy_engine = engine._engine
    assert lmdeploy_engine.session_mgr.request_handle_pool.num_dispatched == 0
    assert lmdeploy_engine.session_mgr.sessions == {}
    assert engine._in_flight == 0


def chat(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


async def test_generate_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    answer_ids = tokenizer.encode(ANSWER)
    cores = replace_core(script=answer_ids + [tokenizer.eos_token_id])
    engine = await started(TurbomindEngine, model_path, tokenizer)
    try:
        prompt = chat(tokenizer, "What is 7 * 6?")
        deltas = [d async for d in engine.generate(request(prompt, max_tokens=32, temperature=0))]
        assert "".join(d.text for d in deltas) == ANSWER
        prompt_ids = tokenizer(prompt)["input_ids"]
        last = deltas[-1]
        assert (last.finish_reason, last.stop_reason) == ("stop", None)
        assert (last.prompt_tokens, last.completion_tokens) == (len(prompt_ids), len(answer_ids) + 1)

        session_id, input_ids, sent = cores[0].requests[-1]
        assert input_ids == prompt_ids  # the replica's prompt tokens, no chat template applied again
        assert (sent.top_k, sent.max_new_tokens) == (1, 32)  # LMDeploy's greedy decoding
        assert tokenizer.eos_token_id in sent.stop_token_ids  # LMDeploy added the model's EOS
        assert cores[0].cancelled == []  # finished on its own: nothing to abort
        assert_released(engine)
        assert engine.max_model_len == 256
    finally:
        await engine.shutdown()
    assert cores[0].closed


async def test_cancel_ends_session_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core(filler=tokenizer.encode("a")[0])
    engine = await started(TurbomindEngine, model_path, tokenizer)
    try:
        stream = engine.generate(request("Hello", max_tokens=200))
        first = await stream.__anext__()
        assert first.text == "a" and first.finish_reason is None
        assert engine.stats().running == 3  # the core's ScheduleMetrics
        await stream.aclose()
        session_id = cores[0].requests[-1][0]
        assert cores[0].cancelled == [session_id]  # LMDeploy's safe_run aborted the request on the core
        assert_released(engine)
    finally:
        await engine.shutdown()


async def test_task_cancellation_aborts_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core(filler=tokenizer.encode("a")[0])
    engine = await started(TurbomindEngine, model_path, tokenizer)
    try:
        got_one = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request("Hello", max_tokens=200)):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cores[0].cancelled == [cores[0].requests[-1][0]]
        assert_released(engine)
    finally:
        await engine.shutdown()


async def test_stop_string_aborts_request_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core(script=tokenizer.encode(ANSWER), filler=tokenizer.encode("a")[0])
    engine = await started(TurbomindEngine, model_path, tokenizer)
    try:
        deltas = [d async for d in engine.generate(request("Q", max_tokens=50, stop=["6 = 4"]))]
        assert "".join(d.text for d in deltas) == "7 * "
        assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", "6 = 4")
        # The engine was still generating: the adapter aborted it through LMDeploy.
        assert cores[0].cancelled == [cores[0].requests[-1][0]]
        assert_released(engine)
    finally:
        await engine.shutdown()


async def test_requested_stop_token_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    ids = tokenizer.encode(ANSWER)
    replace_core(script=ids)
    engine = await started(TurbomindEngine, model_path, tokenizer)
    try:
        deltas = [d async for d in engine.generate(request("Q", max_tokens=50, stop_token_ids=[ids[4]]))]
        assert "".join(d.text for d in deltas) == "7 * 6"
        assert (deltas[-1].finish_reason, deltas[-1].stop_reason, deltas[-1].completion_tokens) == ("stop", ids[4], 5)
        length = [d async for d in engine.generate(request("Q", max_tokens=3))]
        assert "".join(d.text for d in length) == "7 * "
        assert (length[-1].finish_reason, length[-1].completion_tokens) == ("length", 3)
    finally:
        await engine.shutdown()


async def test_bad_requests_fail_before_the_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core(filler=5)
    engine = await started(TurbomindEngine, model_path, tokenizer, {"session_len": 64})
    try:
        with pytest.raises(PromptTooLongError) as info:
            [d async for d in engine.generate(request(ids=[5] * 60, max_tokens=10))]
        assert (info.value.prompt_tokens, info.value.max_model_len, info.value.max_tokens) == (60, 64, 10)
        with pytest.raises(ValueError, match="Unsupported response format"):  # LMDeploy's xgrammar check
            [d async for d in engine.generate(request("Q", regex="(unclosed"))]
        with pytest.raises(ValueError, match="prompt_token_ids must be token ids"):
            [d async for d in engine.generate(request(ids=[10**6]))]
        with pytest.raises(ValueError, match="temperature"):
            [d async for d in engine.generate(request("Q", temperature=3))]
        assert cores[0].requests == []
        assert_released(engine)
    finally:
        await engine.shutdown()


async def test_shutdown_aborts_streams_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core(filler=tokenizer.encode("a")[0], step_s=0.01)
    engine = await started(TurbomindEngine, model_path, tokenizer)
    deltas = []
    got_one = asyncio.Event()

    async def consume():
        try:
            async for delta in engine.generate(request("Hello", max_tokens=200)):
                deltas.append(delta)
                got_one.set()
        finally:
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 10)
    await engine.shutdown()
    await asyncio.wait_for(task, 10)
    assert deltas[-1].finish_reason == "abort"
    assert cores[0].cancelled and cores[0].closed


async def test_stats_and_health_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core()
    engine = TurbomindEngine(model_path, {}, tokenizer=tokenizer)
    assert not engine.stats().healthy
    with pytest.raises(EngineError, match="not started"):
        engine.check_health()
    await engine.start()
    try:
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_cache_usage, stats.healthy) == (3, 2, 0.25, True)
        assert engine.max_model_len == 2048  # session_len from the model's config.json
        engine.check_health()
        cores[0].alive = False
        await engine._health.probe_once()  # LMDeploy's monitor polls every 12 s; probe now
        with pytest.raises(EngineError, match="replaced core reports its loop dead"):
            engine.check_health()
        assert not engine.stats().healthy
    finally:
        await engine.shutdown()


async def test_requests_queued_for_a_slot_count_as_waiting_with_replaced_turbomind_core(
    replace_core, model_path, tokenizer
):
    replace_core(filler=tokenizer.encode("a")[0])
    engine = await started(TurbomindEngine, model_path, tokenizer, {"session_len": 256, "max_batch_size": 1})
    try:
        first = engine.generate(request("Hello", max_tokens=200))
        await first.__anext__()
        second = engine.generate(request("Hello", max_tokens=200))
        queued = asyncio.create_task(second.__anext__())  # waits in LMDeploy's handle pool
        await asyncio.sleep(0.05)
        assert not queued.done()
        assert engine.stats().waiting == 2 + 1  # the core's waiting_seqs + one queued for a request handle
        await first.aclose()
        assert (await asyncio.wait_for(queued, 10)).text == "a"
        await second.aclose()
        assert_released(engine)
        assert engine.stats().tokens_per_s > 0
    finally:
        await engine.shutdown()


async def test_prompt_logprobs_and_score_with_replaced_turbomind_core(replace_core, model_path, tokenizer):
    cores = replace_core()
    engine = await started(TurbomindEngine, model_path, tokenizer)
    try:
        sequences = [[5, 6, 7, 8], [9], [], [11, 12]]
        result = await engine.prompt_logprobs(sequences)
        for ids, lps in zip(sequences, result):
            expected = [
                torch.log_softmax(fake_logits(tuple(ids[:i]), 894), -1)[ids[i]].item() for i in range(1, len(ids))
            ]
            assert lps[:1] == ([None] if ids else [])
            assert lps[1:] == pytest.approx(expected, abs=1e-5)
        assert all(sent.output_logits == "all" for _, _, sent in cores[0].requests)

        prompt, continuations = "What is 7 * 6?", [" 42", " 41"]
        scores = await engine.score(prompt, continuations)
        prompt_len = len(tokenizer(prompt)["input_ids"])
        for continuation, score in zip(continuations, scores):
            ids = tokenizer(prompt + continuation)["input_ids"]
            lps = (await engine.prompt_logprobs([ids]))[0]
            assert score == pytest.approx(math.fsum(lps[prompt_len:]), abs=1e-5)
        assert_released(engine)
        with pytest.raises(PromptTooLongError):
            await engine.prompt_logprobs([[5] * 256])
    finally:
        await engine.shutdown()


async def test_turbomind_scoring_refused_with_prefix_caching_and_replaced_core(replace_core, model_path, tokenizer):
    replace_core()
    engine = await started(TurbomindEngine, model_path, tokenizer, {"enable_prefix_caching": True})
    try:
        with pytest.raises(EngineError, match="enable_prefix_caching: false"):
            await engine.score("Hello", [" there"])
    finally:
        await engine.shutdown()


async def test_pytorch_engine_with_replaced_core(replace_core, model_path, tokenizer):
    cores = replace_core(script=tokenizer.encode(ANSWER) + [tokenizer.eos_token_id])
    engine = await started(LMDeployPytorchEngine, model_path, tokenizer)
    try:
        assert engine.name == "lmdeploy-pytorch"
        assert cores[0].engine_config.device_type == "ascend"
        deltas = [d async for d in engine.generate(request("Q", max_tokens=20, temperature=0.5, seed=3))]
        assert "".join(d.text for d in deltas) == ANSWER and deltas[-1].finish_reason == "stop"
        sent = cores[0].requests[-1][2]
        assert (sent.do_sample, sent.random_seed, sent.temperature) == (True, 3, 0.5)

        ids = [5, 6, 7, 8, 9]
        (lps,) = await engine.prompt_logprobs([ids])
        expected = [torch.log_softmax(fake_logits(tuple(ids[:i]), 894), -1)[ids[i]].item() for i in range(1, 5)]
        assert lps[0] is None and lps[1:] == pytest.approx(expected, abs=1e-5)
        sent = cores[0].requests[-1][2]  # a scoring-only request: LMDeploy's input log-probs
        assert (sent.max_new_tokens, sent.logprobs, sent.logprob_start_len) == (0, 0, 0)
        assert_released(engine)
    finally:
        await engine.shutdown()


async def test_start_reports_a_missing_turbomind_extension(model_path, tokenizer):
    from lmdeploy import turbomind

    if turbomind.is_available():
        pytest.skip("TurboMind's extension loads here")
    engine = TurbomindEngine(model_path, {"session_len": 256}, tokenizer=tokenizer)
    with pytest.raises(EngineError, match="could not start the turbomind engine.*native module is unavailable"):
        await engine.start()


# -- opt-in: the real TurboMind on a CUDA GPU ---------------------------------------------------


@pytest.mark.gpu
async def test_turbomind_generates_on_gpu():
    from lmdeploy import turbomind

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not turbomind.is_available():
        pytest.skip(f"LMDeploy's TurboMind extension does not load here: {turbomind._import_error!r}")
    path = str(resolve_model_source("builtin:tiny-chat"))
    engine = TurbomindEngine(path, {"session_len": 512, "cache_max_entry_count": 0.1, "dtype": "bfloat16"},
                             tokenizer=AutoTokenizer.from_pretrained(path))
    await engine.start()
    try:
        prompt = chat(engine._tokenizer, "What is 7 * 6?")
        deltas = [d async for d in engine.generate(request(prompt, max_tokens=16, temperature=0))]
        assert "".join(d.text for d in deltas) == ANSWER
        assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens > 0
        assert engine.stats().healthy
    finally:
        await engine.shutdown()
