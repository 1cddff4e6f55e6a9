"""The logit knobs of `SamplingParams` (logit_bias, min_tokens, repetition / frequency / presence penalties,
min_p): their checks, the transformers engine against step-by-step greedy loops on the reference model (which
pin their semantics), and their mapping to LMDeploy's GenerationConfig and SGLang's sampling_params."""

import asyncio
import math

import pytest
import torch
from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

from deployments.engines.engine import SamplingParams
from deployments.engines.lmdeploy_config import generation_config
from deployments.engines.sglang_config import sampling_params
from deployments.engines.transformers_sampling import (
    LogitAdjustment,
    RequestSlot,
    gumbel_sample_scores,
)
from tests.engine_helpers import chat_prompt, chat_prompt_ids, collect, make_request, record_batch_rows

COUNT = "Count from 1 to 20."
FRANCE = "What is the capital of France?"


@torch.inference_mode()
def _first_logits(model, prompt_ids):
    return model(torch.tensor([prompt_ids])).logits[0, -1].float()


@torch.inference_mode()
def _manual_greedy(model, prompt_ids, max_tokens, adjust=None, stop_ids=()):
    """Greedy decoding with `adjust(logits, completion)` applied to each step's logits first: the knobs'
    semantics written out once, independently of the engine. Returns (completion ids, finish_reason)."""
    completion: list[int] = []
    past, step_ids = None, torch.tensor([prompt_ids])
    while len(completion) < max_tokens:
        out = model(step_ids, cache=past, use_cache=True)
        past = out.cache
        logits = out.logits[0, -1].float().clone()
        if adjust is not None:
            adjust(logits, completion)
        token = int(logits.argmax())
        completion.append(token)
        if token in stop_ids:
            return completion, "stop"
        step_ids = torch.tensor([[token]])
    return completion, "length"


def _frequency(frequency=0.0, presence=0.0):
    def adjust(logits, completion):
        for token in set(completion):
            count = completion.count(token)
            logits[token] -= frequency * count + presence * (count > 0)

    return adjust


def _repetition(prompt_ids, penalty, with_prompt=True):
    def adjust(logits, completion):
        for token in set(completion) | (set(prompt_ids) if with_prompt else set()):
            value = logits[token]
            logits[token] = value / penalty if value > 0 else value * penalty

    return adjust


def _bias(bias):
    def adjust(logits, completion):
        for token, value in bias.items():
            logits[token] += value

    return adjust


def _min_tokens(min_tokens, blocked):
    def adjust(logits, completion):
        if len(completion) < min_tokens:
            logits[list(blocked)] = -math.inf

    return adjust


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(presence_penalty=2.5), r"^presence_penalty must be a number in \[-2, 2\], got 2\.5$"),
        (dict(frequency_penalty=-3), r"^frequency_penalty must be a number in \[-2, 2\], got -3$"),
        (dict(frequency_penalty=math.nan), r"^frequency_penalty must be"),
        (dict(repetition_penalty=0), r"^repetition_penalty must be a number > 0 \(1 disables it\), got 0$"),
        (dict(min_tokens=-1), r"^min_tokens must be an integer in \[0, max_tokens=16\], got -1$"),
        (dict(max_tokens=4, min_tokens=5), r"^min_tokens must be an integer in \[0, max_tokens=4\], got 5$"),
        (dict(min_p=1.5), r"^min_p must be a number in \[0, 1\], got 1\.5$"),
        (dict(logit_bias=[1, 2]), r"^logit_bias must map token ids to numbers"),
        (dict(logit_bias={"5": 1.0}), r"^logit_bias keys must be token ids in \[0, \d+\), got '5'$"),
        (dict(logit_bias={10**9: 1.0}), r"^logit_bias keys must be token ids in \[0, \d+\), got 1000000000$"),
        (dict(logit_bias={5: 101}), r"^logit_bias\[5\] must be a number in \[-100, 100\], got 101$"),
    ],
)
async def test_bad_knobs_are_value_errors_naming_the_field(engine, sampling, message):
    with pytest.raises(ValueError, match=message):
        await collect(engine, make_request("Hello", **sampling))


def test_adjusts_logits_only_for_non_identity_knobs():
    assert not SamplingParams(min_p=0.5, presence_penalty=0.0, repetition_penalty=1.0).adjusts_logits()
    for knob in (dict(presence_penalty=0.1), dict(frequency_penalty=-0.1), dict(repetition_penalty=1.1),
                 dict(min_tokens=1), dict(logit_bias={3: 0.0})):
        assert SamplingParams(**knob).adjusts_logits(), knob
    # The engine keeps rows that adjust nothing on the plain path.
    assert LogitAdjustment.for_request(SamplingParams(), [1, 2], [0]) is None
    assert LogitAdjustment.for_request(SamplingParams(min_tokens=3, ignore_eos=True), [1, 2], []) is None


# -- the sampling math (no engine) ---------------------------------------------------------------


def _slot(**kw):
    return RequestSlot(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "prompt_len": 1, **kw})


def test_min_p_keeps_tokens_within_its_fraction_of_the_top_probability():
    # p ratios to the top token: 1, e^-0.1 = 0.905, e^-1 = 0.37, e^-3 = 0.05
    logits = torch.tensor([3.0, 2.9, 2.0, 0.0])
    support = lambda **kw: {int(gumbel_sample_scores(logits[None], [_slot(seed=s, **kw)]).argmax()) for s in range(300)}
    assert support(min_p=0.5) == {0, 1}
    assert support(min_p=0.3) == {0, 1, 2}
    assert support(min_p=1.0) == {0}
    # After temperature: at T=0.1 the ratio of token 1 is e^-1 = 0.37.
    assert support(min_p=0.5, temperature=0.1) == {0}
    assert support() == {0, 1, 2, 3}
    # A row without min_p is unaffected by one with it in the same batch.
    rows = torch.stack([logits, logits])
    mixed = gumbel_sample_scores(rows, [_slot(seed=5, min_p=0.9), _slot(seed=5, position=2)])
    assert torch.equal(mixed[1], gumbel_sample_scores(logits[None], [_slot(seed=5, position=2)])[0])
    assert torch.isinf(mixed[0, 2:]).all() and not torch.isinf(mixed[1]).any()


def test_adjustment_applies_bias_penalties_and_min_tokens_in_order():
    adjustment = LogitAdjustment(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, min_tokens=2, blocked_ids=[0],
        logit_bias={1: 1.0, 4: -3.0}, prompt_ids=[3],
    )
    logits = torch.tensor([5.0, 1.0, 2.0, -1.0, 4.0, 6.0])
    adjustment.apply(logits, [2, 2, 4], position=1)
    # 0: blocked; 1: +1 bias; 2: repetition 2 / 2, then -0.25 * 2 - 0.5; 3 (prompt): -1 * 2;
    # 4: bias to 1, repetition 0.5, then -0.25 - 0.5; 5: untouched.
    assert logits.tolist() == [-math.inf, 2.0, 0.0, -2.0, -0.25, 6.0]
    logits = torch.tensor([5.0, 1.0, 2.0, -1.0, 4.0, 6.0])
    adjustment.apply(logits, [2, 2], position=2)  # min_tokens reached: EOS free again
    assert logits[0] == 5.0


# -- the transformers engine: exact outputs ------------------------------------------------------


async def test_logit_bias_minus_100_picks_the_second_best_and_plus_100_forces_a_token(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, FRANCE)
    top = torch.topk(_first_logits(reference_model, prompt_ids), 2)
    best, second = top.indices.tolist()
    assert top.values[0] - 100 < top.values[1]  # -100 really demotes it below the runner-up
    _, _, plain = await collect(engine, make_request(ids=prompt_ids, max_tokens=1, temperature=0.0))
    assert plain == [best]
    _, _, demoted = await collect(engine, make_request(ids=prompt_ids, max_tokens=1, temperature=0.0, logit_bias={best: -100}))
    assert demoted == [second] and second != best

    forced = tokenizer.encode(" Rome", add_special_tokens=False)[0]
    bias = {forced: 100.0}
    deltas, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=6, temperature=0.0, logit_bias=bias))
    expected, finish = _manual_greedy(reference_model, prompt_ids, 6, _bias(bias), stop_ids={tokenizer.eos_token_id})
    assert ids[0] == forced and ids == expected and deltas[-1].finish_reason == finish
    # Sampled rows get the bias too: +100 leaves no other token a chance.
    _, _, hot = await collect(engine, make_request(ids=prompt_ids, max_tokens=1, temperature=1.5, seed=1, logit_bias=bias))
    assert hot == [forced]


async def test_min_tokens_holds_back_eos_and_keeps_the_answer_s_start(engine, reference_model, tokenizer):
    eos = tokenizer.eos_token_id
    # With EOS held back, the first answer rambles on to max_tokens, the second finds EOS again.
    for question, want_finish in (("What is 2 + 2?", "length"), ("Say hello.", "stop")):
        prompt_ids = chat_prompt_ids(tokenizer, question)
        _, _, answer = await collect(engine, make_request(ids=prompt_ids, max_tokens=40, temperature=0.0))
        assert answer[-1] == eos
        k = len(answer) - 1  # tokens before EOS
        deltas, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=40, temperature=0.0, min_tokens=k + 3))
        assert len(ids) >= k + 3 and ids[:k] == answer[:k] and eos not in ids[: k + 3]
        expected, finish = _manual_greedy(reference_model, prompt_ids, 40, _min_tokens(k + 3, {eos}), stop_ids={eos})
        assert ids == expected
        assert (deltas[-1].finish_reason, finish) == (want_finish, want_finish)
        assert deltas[-1].completion_tokens == len(ids)


async def test_min_tokens_holds_back_stop_token_ids_too(engine, reference_model, tokenizer):
    eos = tokenizer.eos_token_id
    prompt_ids = chat_prompt_ids(tokenizer, "Say hello.")
    dot = tokenizer.encode(".", add_special_tokens=False)[0]
    _, text, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=20, temperature=0.0, stop_token_ids=[dot]))
    assert (text, ids[-1]) == ("Hello", dot)
    deltas, _, ids = await collect(
        engine, make_request(ids=prompt_ids, max_tokens=20, temperature=0.0, stop_token_ids=[dot], min_tokens=4)
    )
    expected, finish = _manual_greedy(reference_model, prompt_ids, 20, _min_tokens(4, {dot, eos}), stop_ids={dot, eos})
    assert ids == expected and len(ids) >= 4 and dot not in ids[:4] and ids[-1] == dot
    assert (deltas[-1].finish_reason, finish, deltas[-1].stop_reason) == ("stop", "stop", dot)


async def test_a_complete_grammar_wins_over_min_tokens(engine, tokenizer):
    # Once "yes" is matched the grammar allows only EOS, which min_tokens would hold back: the mask wins.
    deltas, text, ids = await collect(engine, make_request("Hello", max_tokens=10, temperature=0.0, regex="yes", min_tokens=5))
    assert text == "yes" and ids[-1] == tokenizer.eos_token_id
    assert deltas[-1].finish_reason == "stop"


async def test_frequency_and_presence_penalties_count_completion_tokens(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, COUNT)
    eos = {tokenizer.eos_token_id}
    _, _, plain = await collect(engine, make_request(ids=prompt_ids, max_tokens=30, temperature=0.0))
    outputs = {}
    for frequency, presence in ((2.0, 0.0), (0.0, 2.0), (1.0, -1.5)):
        knobs = dict(frequency_penalty=frequency, presence_penalty=presence)
        deltas, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=30, temperature=0.0, **knobs))
        expected, finish = _manual_greedy(reference_model, prompt_ids, 30, _frequency(frequency, presence), stop_ids=eos)
        assert ids == expected, knobs
        assert deltas[-1].finish_reason == finish
        outputs[frequency, presence] = ids
    assert outputs[2.0, 0.0] != plain


async def test_repetition_penalty_counts_prompt_and_completion_tokens(engine, reference_model, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, COUNT)
    eos = {tokenizer.eos_token_id}
    _, _, plain = await collect(engine, make_request(ids=prompt_ids, max_tokens=20, temperature=0.0))
    for penalty in (3.0, 0.5):
        _, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=20, temperature=0.0, repetition_penalty=penalty))
        expected, _ = _manual_greedy(reference_model, prompt_ids, 20, _repetition(prompt_ids, penalty), stop_ids=eos)
        assert ids == expected, penalty
    # With 3.0 the prompt's own "1" is penalized: a completion-only penalty would still start with it.
    completion_only, _ = _manual_greedy(reference_model, prompt_ids, 20, _repetition(prompt_ids, 3.0, with_prompt=False), stop_ids=eos)
    _, _, ids = await collect(engine, make_request(ids=prompt_ids, max_tokens=20, temperature=0.0, repetition_penalty=3.0))
    assert ids != plain and ids != completion_only and ids[0] != plain[0] == completion_only[0]


async def test_min_p_one_samples_the_greedy_tokens(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "Tell me a story.")
    base = dict(max_tokens=20, ignore_eos=True)
    _, _, greedy = await collect(engine, make_request(prompt, temperature=0.0, **base))
    for seed in (4, 5):
        _, _, hot = await collect(engine, make_request(prompt, temperature=1.5, seed=seed, **base))
        assert hot != greedy  # the test can fail: without min_p this seed wanders off
        _, _, only_top = await collect(engine, make_request(prompt, temperature=1.5, seed=seed, min_p=1.0, **base))
        assert only_top == greedy
    # min_p leaves greedy requests alone.
    _, _, greedy_min_p = await collect(engine, make_request(prompt, temperature=0.0, min_p=0.9, **base))
    assert greedy_min_p == greedy


async def test_rows_without_knobs_are_unaffected_by_rows_with_them(engine, tokenizer, monkeypatch):
    count, story = chat_prompt(tokenizer, COUNT), chat_prompt(tokenizer, "Tell me a story.")
    plain_greedy = make_request(story, max_tokens=24, temperature=0.0, ignore_eos=True)
    plain_hot = make_request(story, max_tokens=24, temperature=1.2, seed=9, ignore_eos=True)
    knobs = make_request(count, max_tokens=24, temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.3, logit_bias={11: 5.0}, min_tokens=20)
    hot_knobs = make_request(count, max_tokens=24, temperature=1.0, seed=2, min_p=0.2, presence_penalty=1.0)
    alone = [(await collect(engine, r))[2] for r in (plain_greedy, plain_hot, knobs, hot_knobs)]
    rows_per_step = record_batch_rows(engine, monkeypatch)
    together = await asyncio.gather(*(collect(engine, r) for r in (plain_greedy, plain_hot, knobs, hot_knobs)))
    assert [ids for _, _, ids in together] == alone
    assert max(rows_per_step) == 4  # they really shared forward passes


# -- LMDeploy: GenerationConfig ------------------------------------------------------------------


def test_lmdeploy_maps_min_tokens_and_min_p():
    config = generation_config(SamplingParams(temperature=0.7, min_p=0.1, min_tokens=5, max_tokens=20))
    assert (config.min_p, config.min_new_tokens, config.do_sample) == (0.1, 5, True)
    greedy = generation_config(SamplingParams(temperature=0, min_p=0.3, min_tokens=2))
    assert (greedy.min_p, greedy.min_new_tokens, greedy.top_k) == (0.0, 2, 1)  # min_p is for sampled requests only
    plain = generation_config(SamplingParams())
    assert (plain.min_p, plain.min_new_tokens, plain.repetition_penalty) == (0.0, None, 1.0)
    # Explicit defaults are no request for an unsupported knob.
    generation_config(SamplingParams(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={}))
    # min_tokens with ignore_eos but no stop ids: nothing to hold back (TurboMind would still hold EOS).
    assert generation_config(SamplingParams(min_tokens=3, ignore_eos=True)).min_new_tokens is None


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(presence_penalty=0.5), ("presence_penalty is not supported by the LMDeploy engines (turbomind, lmdeploy-pytorch): "
         "LMDeploy's GenerationConfig has no presence penalty, got 0.5")),
        (dict(frequency_penalty=-1.0), ("frequency_penalty is not supported by the LMDeploy engines (turbomind, lmdeploy-pytorch): "
         "LMDeploy's GenerationConfig has no frequency penalty, got -1.0")),
        (dict(logit_bias={5: 1.0}), ("logit_bias is not supported by the LMDeploy engines (turbomind, lmdeploy-pytorch): "
         "TurboMind has no logit bias, got {5: 1.0}")),
        (dict(repetition_penalty=1.2), ("repetition_penalty is not supported by the LMDeploy engines (turbomind, lmdeploy-pytorch): "
         "LMDeploy drops it from greedy requests, and its PyTorch engine penalizes only the completion's tokens, "
         "not the prompt's, got 1.2")),
        (dict(min_tokens=2, ignore_eos=True, stop_token_ids=[7]), ("min_tokens with ignore_eos and stop_token_ids is not "
         "supported by the LMDeploy engines (turbomind, lmdeploy-pytorch): LMDeploy cannot hold stop token ids back "
         "while it ignores EOS")),
    ],
)
def test_lmdeploy_refuses_what_it_cannot_honour(sampling, message):
    with pytest.raises(ValueError) as info:
        generation_config(SamplingParams(**sampling))
    assert str(info.value) == message


# -- SGLang: sampling_params ---------------------------------------------------------------------


def test_sglang_maps_penalties_min_tokens_min_p_and_logit_bias(tokenizer):
    sp = SamplingParams(
        temperature=0.8, presence_penalty=0.5, frequency_penalty=-1, min_tokens=4, max_tokens=10, min_p=0.05,
        logit_bias={3: -100, 17: 2.5},
    )
    params = sampling_params(sp, tokenizer=tokenizer, vocab_size=len(tokenizer))
    assert {k: params[k] for k in ("presence_penalty", "frequency_penalty", "min_new_tokens", "min_p", "logit_bias")} == {
        "presence_penalty": 0.5, "frequency_penalty": -1.0, "min_new_tokens": 4, "min_p": 0.05,
        "logit_bias": {"3": -100.0, "17": 2.5},
    }
    sgl = SGLangSamplingParams(**params)
    sgl.verify(len(tokenizer))
    sgl.normalize(tokenizer)
    assert (sgl.presence_penalty, sgl.frequency_penalty, sgl.min_new_tokens, sgl.min_p) == (0.5, -1.0, 4, 0.05)
    assert sgl.logit_bias == {"3": -100.0, "17": 2.5}
    # Greedy: penalties and bias stay, min_p goes (sampled requests only).
    greedy = sampling_params(SamplingParams(temperature=0, min_p=0.5, presence_penalty=1.0, logit_bias={3: 1}))
    assert "min_p" not in greedy and greedy["presence_penalty"] == 1.0 and greedy["logit_bias"] == {"3": 1.0}
    # Defaults add nothing; min_tokens needs no tokenizer here (SGLang's engine has one).
    knob_keys = {"presence_penalty", "frequency_penalty", "repetition_penalty", "min_new_tokens", "min_p", "logit_bias"}
    assert not knob_keys & set(sampling_params(SamplingParams(temperature=0.5)))
    assert sampling_params(SamplingParams(min_tokens=3))["min_new_tokens"] == 3
    # Under ignore_eos only stop ids end a request: without them min_tokens holds nothing back (SGLang would hold EOS).
    assert "min_new_tokens" not in sampling_params(SamplingParams(min_tokens=3, ignore_eos=True))
    assert sampling_params(SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=[7]))["min_new_tokens"] == 3


@pytest.mark.parametrize(
    "sampling, message",
    [
        (SamplingParams(repetition_penalty=1.3), ("repetition_penalty is not supported by the sglang engine: SGLang "
         "penalizes only the completion's tokens, not the prompt's, got 1.3")),
        (SamplingParams(logit_bias={5000: 1.0}), "logit_bias keys must be token ids in [0, 1000), got 5000"),
        (SamplingParams(min_tokens=20), "min_tokens must be an integer in [0, max_tokens=16], got 20"),
    ],
)
def test_sglang_refuses_bad_or_unsupported_knobs(sampling, message):
    with pytest.raises(ValueError) as info:
        sampling_params(sampling, vocab_size=1000)
    assert str(info.value) == message
