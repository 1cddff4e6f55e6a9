"""Log-probs of generated tokens through the engine seam (`SamplingParams.logprobs`, `Delta.logprobs`): their
checks, `DeltaMapper`'s cuts, the base model's merge, the transformers engine against the reference model's
raw log_softmax, and the engines that refuse them (LMDeploy, SGLang)."""

import asyncio
import dataclasses
import math
import pickle

import pytest
import torch

from deployments.engines import transformers_sampling
from deployments.engines.engine import Delta, SamplingParams, validate_sampling
from deployments.engines.lmdeploy_config import generation_config
from deployments.engines.sglang_config import sampling_params
from deployments.engines.text import DeltaMapper
from deployments.engines.transformers_engine import TransformersEngine
from tests.engine_helpers import chat_prompt_ids, collect, make_request

COUNT = "Count from 1 to 20."
STORY = "Tell me a story."


@torch.inference_mode()
def _reference_logprobs(model, prompt_ids, completion):
    """Raw log_softmax of the reference model's logits at each completion position: [len(completion), vocab]."""
    ids = list(prompt_ids) + list(completion)
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(ids) - 1], dim=-1)


def _entries(deltas):
    return [e for d in deltas for e in d.logprobs]


def _shape(entries):
    """Entries without their log-prob values: ids and texts."""
    return [(e[0], e[1], [(t, text) for t, text, _ in e[3]]) for e in entries]


# The engine's values come from cached, chunked, batched forward passes, the reference's from one plain
# forward pass: both float32, they differ by float32 noise (~1e-5 against a float64 run each, and the
# reference model's own KV-cached decode differs from its plain forward pass by as much), as in
# test_logprobs_http.py.
LOGPROB_TOLERANCE = 1e-4


def _check_against_reference(entries, ids, reference, k, tokenizer):
    assert len(entries) == len(ids) == reference.shape[0]
    for position, (entry, token) in enumerate(zip(entries, ids)):
        token_id, text, logprob, top = entry
        assert token_id == token
        assert text == tokenizer.decode([token])
        assert abs(logprob - float(reference[position, token])) < LOGPROB_TOLERANCE, (position, logprob)
        assert len(top) == k
        values, top_ids = reference[position].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _, _ in top] == top_ids.tolist()
        assert [text for _, text, _ in top] == [tokenizer.decode([t]) for t in top_ids.tolist()]
        for (_, _, lp), ref in zip(top, values.tolist()):
            assert abs(lp - ref) < LOGPROB_TOLERANCE
        assert [lp for _, _, lp in top] == sorted((lp for _, _, lp in top), reverse=True)


# -- the seam: checks, DeltaMapper, merge --------------------------------------------------------


@pytest.mark.parametrize("value", [21, -1, "3", 2.0, True])
def test_bad_logprobs_are_value_errors_naming_logprobs(value):
    with pytest.raises(ValueError, match="logprobs"):
        validate_sampling(SamplingParams(logprobs=value))


@pytest.mark.parametrize("value", [None, 0, 1, 20])
def test_logprobs_in_range_are_accepted(value):
    validate_sampling(SamplingParams(logprobs=value))


async def test_engine_refuses_bad_logprobs(engine):
    with pytest.raises(ValueError, match="logprobs"):
        await collect(engine, make_request("hi", logprobs=21))


def _entry(token_id):
    return [token_id, f"t{token_id}", -float(token_id), [[token_id, f"t{token_id}", -float(token_id)]]]


def test_delta_mapper_cuts_logprobs_like_ids_at_a_stop_token(tokenizer):
    stop_id = tokenizer("Hello")["input_ids"][0]
    ids = tokenizer(" one two three")["input_ids"]
    mapper = DeltaMapper(tokenizer, SamplingParams(stop_token_ids=[stop_id], logprobs=1), [1, 2, 3])
    first = mapper.feed(ids[:2], logprobs=[_entry(t) for t in ids[:2]])
    assert first.logprobs == [_entry(t) for t in ids[:2]]
    last = mapper.feed([ids[2], stop_id, 7], logprobs=[_entry(ids[2]), _entry(stop_id), _entry(7)])
    assert last.token_ids == [ids[2], stop_id]
    assert last.logprobs == [_entry(ids[2]), _entry(stop_id)]
    assert last.finish_reason == "stop" and last.completion_tokens == 4


def test_delta_mapper_without_logprobs_gives_none_and_checks_alignment(tokenizer):
    ids = tokenizer(" one two")["input_ids"]
    plain = DeltaMapper(tokenizer, SamplingParams(), [1])
    assert plain.feed(ids, logprobs=[_entry(t) for t in ids]).logprobs is None
    wanting = DeltaMapper(tokenizer, SamplingParams(logprobs=0), [1])
    with pytest.raises(RuntimeError, match="log-prob entries"):
        wanting.feed(ids, logprobs=[_entry(ids[0])])
    # A finishing step without ids still carries an (empty) list.
    wanting = DeltaMapper(tokenizer, SamplingParams(logprobs=0), [1])
    assert wanting.feed([], "length", logprobs=[]).logprobs == []


def test_merge_concatenates_logprobs_like_token_ids():
    from deployments.base_model import _merge

    a = Delta("a", [1, 2], 3, 2, logprobs=[_entry(1), _entry(2)])
    b = Delta("b", [5], 3, 3, "length", logprobs=[_entry(5)])
    merged = _merge([a, b])
    assert merged.token_ids == [1, 2, 5] and merged.logprobs == [_entry(1), _entry(2), _entry(5)]
    assert merged.finish_reason == "length" and merged.text == "ab"
    plain = _merge([Delta("a", [1], 3, 1), Delta("b", [2], 3, 2)])
    assert plain.logprobs is None and plain.token_ids == [1, 2]
    # Deltas cross Ray processes: plain data, as the base model sends them.
    assert pickle.loads(pickle.dumps(merged)) == merged
    assert dataclasses.asdict(merged)["logprobs"] == [_entry(1), _entry(2), _entry(5)]


# -- transformers engine -----------------------------------------------------------------------


async def test_greedy_logprobs_are_the_raw_model_s_and_the_token_is_top_1(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, COUNT)
    deltas, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=5))
    plain = (await collect(engine, make_request(ids=prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True)))[2]
    assert ids == plain and len(ids) == 16
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    entries = _entries(deltas)
    _check_against_reference(entries, ids, _reference_logprobs(reference_model, prompt_ids, ids), 5, tokenizer)
    for token_id, _, logprob, top in entries:
        assert top[0][0] == token_id and top[0][2] == logprob
        assert logprob <= 0.0


async def test_logprobs_0_gives_the_token_s_only_and_none_records_nothing(engine, reference_model, tokenizer, monkeypatch):
    prompt_ids = chat_prompt_ids(tokenizer, STORY)
    deltas, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0))
    entries = _entries(deltas)
    assert all(top == [] for *_, top in entries)
    _check_against_reference(entries, ids, _reference_logprobs(reference_model, prompt_ids, ids), 0, tokenizer)

    recorded = []
    record = transformers_sampling._record_logprobs
    monkeypatch.setattr(transformers_sampling, "_record_logprobs", lambda *a: recorded.append(a) or record(*a))
    stream = engine.generate(make_request(ids=prompt_ids, max_tokens=8, temperature=0.0, ignore_eos=True))
    plain = [await anext(stream)]
    (slot,) = engine._processor.slots.values()
    plain += [d async for d in stream]
    assert slot.logprobs is None and slot.logprob_entries == {}
    assert recorded == []
    assert all(d.logprobs is None for d in plain)
    assert [t for d in plain for t in d.token_ids] == ids


async def test_sampled_logprobs_follow_the_sampled_tokens(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, STORY)
    sampled = dict(max_tokens=16, temperature=1.0, seed=9, ignore_eos=True)
    deltas, _, ids = await collect(engine, make_request(ids=prompt_ids, logprobs=3, **sampled))
    assert (await collect(engine, make_request(ids=prompt_ids, **sampled)))[2] == ids  # log-probs change no sample
    entries = _entries(deltas)
    reference = _reference_logprobs(reference_model, prompt_ids, ids)
    _check_against_reference(entries, ids, reference, 3, tokenizer)
    # A seed whose sample leaves the greedy path, so the chosen token really is the sampled one.
    assert any(token_id != top[0][0] for token_id, _, _, top in entries)


async def test_temperature_and_knobs_do_not_change_the_raw_logprobs(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, COUNT)
    request = make_request(
        ids=prompt_ids, max_tokens=10, temperature=0.7, seed=4, ignore_eos=True, logit_bias={11: 5.0},
        frequency_penalty=1.0, logprobs=2,
    )
    deltas, _, ids = await collect(engine, request)
    _check_against_reference(_entries(deltas), ids, _reference_logprobs(reference_model, prompt_ids, ids), 2, tokenizer)


async def test_stop_token_and_stop_string_keep_logprobs_aligned(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, "What color is the sky?")
    _, _, full_ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=12, temperature=0.0, ignore_eos=True))
    stop_id = full_ids[3]
    cut = full_ids.index(stop_id)
    deltas, _, ids = await collect(
        engine, make_request(ids=prompt_ids, max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id], logprobs=1)
    )
    assert ids == full_ids[: cut + 1] and deltas[-1].stop_reason == stop_id
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert len(_entries(deltas)) == deltas[-1].completion_tokens == cut + 1
    _check_against_reference(_entries(deltas), ids, _reference_logprobs(reference_model, prompt_ids, ids), 1, tokenizer)

    story = chat_prompt_ids(tokenizer, STORY)
    _, full_text, _ = await collect(engine, make_request(ids=story, max_tokens=40, temperature=0.0))
    assert "robot" in full_text, full_text
    deltas, text, ids = await collect(engine, make_request(ids=story, max_tokens=40, temperature=0.0, stop=["robot"], logprobs=2))
    assert deltas[-1].stop_reason == "robot" and text == full_text[: full_text.index("robot")]
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert len(_entries(deltas)) == deltas[-1].completion_tokens == len(ids)
    _check_against_reference(_entries(deltas), ids, _reference_logprobs(reference_model, story, ids), 2, tokenizer)
    await asyncio.sleep(0.2)
    assert engine._processor.slots == {}


async def test_concurrent_requests_with_and_without_logprobs_match_their_solo_runs(engine, tokenizer):
    with_lp = make_request(ids=chat_prompt_ids(tokenizer, COUNT), max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=4)
    without = make_request(ids=chat_prompt_ids(tokenizer, STORY), max_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    solo = [await collect(engine, r) for r in (with_lp, without)]
    together = await asyncio.gather(*(collect(engine, r) for r in (with_lp, without)))
    for (solo_deltas, _, solo_ids), (deltas, _, ids) in zip(solo, together):
        assert ids == solo_ids
    # Same tokens and texts; the values agree up to the float noise of a different batch shape.
    batched, alone = _entries(together[0][0]), _entries(solo[0][0])
    assert _shape(batched) == _shape(alone) and len(batched) == 20
    values = [(e[2], *(lp for *_, lp in e[3])) for e in batched]
    alone_values = [(e[2], *(lp for *_, lp in e[3])) for e in alone]
    assert all(abs(x - y) < 1e-5 for v, w in zip(values, alone_values) for x, y in zip(v, w))
    assert [e[0] for e in _entries(together[0][0])] == together[0][2]
    assert all(d.logprobs is None for d in together[1][0])


async def test_logprobs_stay_aligned_when_evicted_requests_are_re_prefilled(model_path, reference_model, tokenizer):
    # As test_kv_cache_pressure_preempts_requests_without_changing_outputs: the manager evicts and re-prefills.
    args = {"max_model_len": 256, "block_size": 16, "num_blocks": 24, "max_batch_tokens": 64, "num_threads": 1}
    eng = TransformersEngine(model_path, args)
    await eng.start()
    try:
        from deployments.models.corpus import CHAT_PAIRS

        prompts = [chat_prompt_ids(tokenizer, q) for q, _ in CHAT_PAIRS[:20]]
        results = await asyncio.gather(
            *(collect(eng, make_request(ids=p, max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)) for p in prompts)
        )
        for prompt_ids, (deltas, _, ids) in zip(prompts, results):
            entries = _entries(deltas)
            assert [e[0] for e in entries] == ids and len(ids) == 32
            assert all(e[0] == e[3][0][0] for e in entries)  # greedy: the token is top-1
        _check_against_reference(_entries(results[0][0]), results[0][2], _reference_logprobs(reference_model, prompts[0], results[0][2]), 1, tokenizer)
    finally:
        await eng.shutdown()


# -- engines without log-probs yet ------------------------------------------------------------------


def test_lmdeploy_refuses_logprobs():
    with pytest.raises(ValueError, match="logprobs are not supported by the LMDeploy engines .* yet"):
        generation_config(SamplingParams(logprobs=0))
    assert generation_config(SamplingParams(logprobs=None)).max_new_tokens == 16


def test_sglang_refuses_logprobs():
    with pytest.raises(ValueError, match="logprobs are not supported by the sglang engine yet"):
        sampling_params(SamplingParams(logprobs=5))
    assert "return_logprob" not in sampling_params(SamplingParams())
