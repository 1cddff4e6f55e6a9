"""The transformers CPU engine: one continuous-batching loop, per-request sampling, stops, cancel, score,
prompt log-probs. (Constrained decoding: test_constraints.py.)"""

import asyncio
import itertools
import math

import pytest
import torch

from deployments.models.corpus import CHAT_PAIRS
from tests.engine_helpers import chat_prompt, collect, make_request, record_batch_rows
from deployments.engines.engine import EngineError, PromptTooLongError
from deployments.engines import transformers_engine
from deployments.engines.registry import engine_args_checker
from deployments.engines.transformers_config import check_engine_args
from deployments.engines.transformers_engine import TransformersEngine
from deployments.engines.transformers_sampling import RequestSlot, gumbel_sample_scores

QUESTIONS = [q for q, _ in CHAT_PAIRS]


@pytest.fixture(scope="module")
def reference_model(reference_model):
    reference_model.generation_config.eos_token_id = None  # decode past EOS, like the engine with ignore_eos
    return reference_model


def _hf_greedy(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def _plug_mask(engine, make_mask):
    """Plugs a test mask into the engine's `_logits_mask` hook (undo with `del engine._logits_mask`)."""

    async def logits_mask(request):
        return make_mask()

    engine._logits_mask = logits_mask


async def _wait_idle(engine, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        s = engine.stats()
        if s.running == 0 and s.waiting == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


# -- sampling math (no engine) -------------------------------------------------------------------


def _slot(**kw):
    return RequestSlot(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "prompt_len": 1, **kw})


def test_gumbel_argmax_samples_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    counts = torch.zeros(4)
    n = 2000
    for seed in range(n):
        counts[gumbel_sample_scores(logits[None], [_slot(temperature=0.7, seed=seed)]).argmax()] += 1
    expected = torch.softmax(logits / 0.7, dim=-1)
    assert torch.allclose(counts / n, expected, atol=0.04), (counts / n, expected)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0, -2.0])
    top_k = {int(gumbel_sample_scores(logits[None], [_slot(top_k=2, seed=s)]).argmax()) for s in range(300)}
    assert top_k == {0, 1}
    # p = (0.505, 0.457, 0.025, ...): top_p=0.6 keeps tokens 0 and 1, top_p=0.5 keeps token 0 alone
    top_p = {int(gumbel_sample_scores(logits[None], [_slot(top_p=0.6, seed=s)]).argmax()) for s in range(300)}
    assert top_p == {0, 1}
    only = {int(gumbel_sample_scores(logits[None], [_slot(top_p=0.5, seed=s)]).argmax()) for s in range(100)}
    assert only == {0}
    # A top_p that is 0 in float32 (5e-324) still keeps the most likely token, here one a mask left.
    masked = torch.tensor([-math.inf, 2.9, 0.0, -math.inf, -2.0])
    tiny = {int(gumbel_sample_scores(masked[None], [_slot(top_p=5e-324, seed=s)]).argmax()) for s in range(50)}
    assert tiny == {1}


def test_noise_depends_only_on_seed_and_position():
    logits = torch.randn(2, 50)
    a = gumbel_sample_scores(logits, [_slot(seed=7, position=3), _slot(temperature=2.0, seed=1)])
    b = gumbel_sample_scores(logits[:1], [_slot(seed=7, position=3)])
    assert torch.equal(a[0], b[0])
    c = gumbel_sample_scores(logits[:1], [_slot(seed=7, position=4)])
    assert not torch.equal(b, c)


# -- construction and validation -----------------------------------------------------------------


def test_registry_finds_the_checker():
    assert engine_args_checker("transformers") is check_engine_args
    check_engine_args({"max_num_seqs": 4, "dtype": "bfloat16"})
    with pytest.raises(ValueError, match=r"^engine_args\.max_num_seqs must be a positive integer, got 0$"):
        check_engine_args({"max_num_seqs": 0})
    with pytest.raises(ValueError, match="accelerator.count must be 1, got 2"):
        check_engine_args({}, 2)


def test_unknown_engine_arg_names_the_key_and_the_allowed_ones(model_path):
    with pytest.raises(ValueError) as e:
        TransformersEngine(model_path, {"max_seqs": 4})
    assert "max_seqs" in str(e.value) and "max_num_seqs" in str(e.value)


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"dtype": "int8"}, "dtype"),
        ({"max_model_len": 100000}, "max_model_len"),
        ({"num_blocks": 1, "block_size": 16}, "num_blocks"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
    ],
)
def test_bad_engine_args(model_path, args, fragment):
    with pytest.raises(ValueError, match=fragment):
        TransformersEngine(model_path, args)


@pytest.mark.parametrize(
    "sampling, fragment",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"regex": "[a-z]+", "json_schema": "{}"}, "at most one of regex and json_schema"),
        ({"regex": "[0-9"}, "invalid regex"),
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ],
)
async def test_bad_sampling_values_raise_value_error(engine, sampling, fragment):
    with pytest.raises(ValueError, match=fragment):
        await collect(engine, make_request("Hello", **sampling))


async def test_prompt_too_long_reports_both_numbers(engine):
    ids = [5] * 250
    with pytest.raises(PromptTooLongError) as e:
        await collect(engine, make_request(ids=ids, max_tokens=10))
    assert (e.value.prompt_tokens, e.value.max_model_len, e.value.max_tokens) == (250, 256, 10)
    assert "256" in str(e.value) and "250" in str(e.value)


# -- generation ----------------------------------------------------------------------------------


async def test_greedy_equals_hf_generate(engine, reference_model, tokenizer):
    for question in ["What is the capital of France?", "中国的首都是哪里？", "Tell me a story."]:
        prompt = chat_prompt(tokenizer, question)
        deltas, text, ids = await collect(engine, make_request(prompt, max_tokens=40, temperature=0.0, ignore_eos=True))
        assert ids == _hf_greedy(reference_model, tokenizer, prompt, 40)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 40


async def test_long_prompt_is_prefilled_in_chunks_and_stays_exact(engine, reference_model, tokenizer):
    messages = [
        {"role": "system", "content": " ".join(["You are a helpful assistant."] * 16)},
        {"role": "user", "content": "Tell me a story."},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert len(tokenizer(prompt)["input_ids"]) > 2 * 64
    _, _, ids = await collect(engine, make_request(prompt, max_tokens=30, temperature=0.0, ignore_eos=True))
    assert ids == _hf_greedy(reference_model, tokenizer, prompt, 30)


async def test_trained_answer_ends_on_eos_with_stop(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    deltas, text, ids = await collect(engine, make_request(prompt, temperature=0.0))
    assert text == "The capital of France is Paris."
    assert ids[-1] == tokenizer.eos_token_id
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", None)
    assert deltas[-1].completion_tokens == len(ids)
    assert deltas[-1].prompt_tokens == len(tokenizer(prompt)["input_ids"])


async def test_chinese_streams_without_replacement_chars(engine, tokenizer):
    questions = ["中国的首都是哪里？", "今天天气怎么样？", "给我讲一个故事。", "介绍一下长城。", "How do you say hello in Chinese?"]
    results = await asyncio.gather(
        *(collect(engine, make_request(chat_prompt(tokenizer, q), max_tokens=48, temperature=0.0)) for q in questions)
    )
    split_characters = 0
    for deltas, text, ids in results:
        assert not any("\ufffd" in d.text for d in deltas)
        content_ids = ids[:-1] if ids[-1] == tokenizer.eos_token_id else ids
        assert text == tokenizer.decode(content_ids, skip_special_tokens=True)
        split_characters += sum("\ufffd" in tokenizer.decode([i]) for i in content_ids)
    assert split_characters > 10  # the answers really contain characters spread over several tokens


async def test_prompt_as_text_or_token_ids_is_the_same(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "What color is the sky?")
    ids = tokenizer(prompt)["input_ids"]
    a = await collect(engine, make_request(prompt, max_tokens=6, temperature=0.0))
    b = await collect(engine, make_request(ids=ids, max_tokens=6, temperature=0.0))
    assert a[2] == b[2] and a[0][-1].prompt_tokens == len(ids)


async def test_sixteen_plus_concurrent_requests_are_batched_and_correct(
    engine, reference_model, tokenizer, monkeypatch
):
    rows_per_step = record_batch_rows(engine, monkeypatch)
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS[:20]]
    expected = [_hf_greedy(reference_model, tokenizer, p, 12) for p in prompts]
    results = await asyncio.gather(
        *(collect(engine, make_request(p, max_tokens=12, temperature=0.0, ignore_eos=True)) for p in prompts)
    )
    for (deltas, text, ids), want in zip(results, expected):
        assert ids == want
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert deltas[-1].finish_reason == "length"
        assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)
    assert max(rows_per_step) == 20  # all of them decoded in the same forward passes
    await _wait_idle(engine)


async def test_concurrent_sampling_with_different_temperatures_and_seeds_is_reproducible(engine, tokenizer):
    story = chat_prompt(tokenizer, "Tell me a story.")
    hot = dict(prompt=story, max_tokens=24, temperature=1.5, top_p=0.95, seed=11, ignore_eos=True)
    story_zh = chat_prompt(tokenizer, "给我讲一个故事。")
    warm = dict(prompt=story_zh, max_tokens=24, temperature=1.2, top_k=20, seed=22, ignore_eos=True)
    alone_hot = (await collect(engine, make_request(**hot)))[2]
    alone_warm = (await collect(engine, make_request(**warm)))[2]
    # Same requests again, now sharing batches with each other and with unrelated traffic.
    noise = [make_request(chat_prompt(tokenizer, q), max_tokens=16, temperature=1.0, ignore_eos=True) for q in QUESTIONS[:6]]
    together = await asyncio.gather(
        collect(engine, make_request(**hot)), collect(engine, make_request(**warm)), *(collect(engine, r) for r in noise)
    )
    assert together[0][2] == alone_hot
    assert together[1][2] == alone_warm
    other_seed = (await collect(engine, make_request(**{**hot, "seed": 12})))[2]
    assert other_seed != alone_hot
    greedy = (await collect(engine, make_request(story, max_tokens=24, temperature=0.0, ignore_eos=True)))[2]
    assert alone_hot != greedy


async def test_unseeded_sampling_varies(engine, tokenizer):
    request = make_request(chat_prompt(tokenizer, "Tell me a story."), max_tokens=24, temperature=1.5, ignore_eos=True)
    runs = [(await collect(engine, request))[2] for _ in range(3)]
    assert len({tuple(r) for r in runs}) > 1


async def test_max_tokens_finishes_with_length(engine, tokenizer):
    request = make_request(chat_prompt(tokenizer, "Tell me a story."), max_tokens=7, temperature=1.0, ignore_eos=True)
    deltas, _, ids = await collect(engine, request)
    assert len(ids) == 7
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 7
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_ignore_eos_decodes_past_the_answer(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    deltas, text, ids = await collect(engine, make_request(prompt, max_tokens=20, temperature=0.0, ignore_eos=True))
    assert tokenizer.eos_token_id in ids[:-1] and len(ids) == 20
    assert deltas[-1].finish_reason == "length" and text.startswith("The capital of France is Paris.")


async def test_stop_string_cuts_before_it_and_cancels(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "Tell me a story.")
    _, full_text, full_ids = await collect(engine, make_request(prompt, max_tokens=40, temperature=0.0))
    stop = "robot"
    assert stop in full_text, full_text
    request = make_request(prompt, max_tokens=40, temperature=0.0, stop=["@@never@@", stop])
    deltas, text, ids = await collect(engine, request)
    assert text == full_text[: full_text.index(stop)]
    assert not any(fragment in d.text for d in deltas for fragment in ("rob", "robot"))
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    assert ids == full_ids[: len(ids)] and len(ids) < len(full_ids)
    await _wait_idle(engine)


async def test_stop_token_id_finishes_with_stop_and_is_not_in_the_text(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "What color is the sky?")
    _, _, full_ids = await collect(engine, make_request(prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
    stop_id = full_ids[3]
    cut = full_ids.index(stop_id)
    deltas, text, ids = await collect(
        engine, make_request(prompt, max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
    )
    assert ids == full_ids[: cut + 1]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop_id
    assert deltas[-1].completion_tokens == cut + 1
    assert text == tokenizer.decode(full_ids[:cut], skip_special_tokens=True)


async def test_logits_mask_hook_constrains_every_row(engine):
    allowed = 42

    class OnlyOneToken:
        def apply(self, logits, completion_ids):
            keep = logits[allowed].clone()
            logits.fill_(-math.inf)
            logits[allowed] = keep

    _plug_mask(engine, OnlyOneToken)
    try:
        greedy, hot = await asyncio.gather(
            collect(engine, make_request("Hello", max_tokens=5, temperature=0.0, ignore_eos=True)),
            collect(engine, make_request("Hello", max_tokens=5, temperature=2.0, top_p=0.5, ignore_eos=True)),
        )
    finally:
        del engine._logits_mask
    assert greedy[2] == hot[2] == [allowed] * 5


async def test_a_failing_request_ends_with_engine_error_and_the_engine_survives(engine):
    class Broken:
        def apply(self, logits, completion_ids):
            if len(completion_ids) >= 2:
                raise RuntimeError("mask exploded")

    healthy = engine.generate(make_request("你好世界", max_tokens=10, temperature=0.0, ignore_eos=True))
    first = await healthy.__anext__()  # admitted before the broken mask is plugged in
    _plug_mask(engine, Broken)
    try:
        with pytest.raises(EngineError, match="mask exploded"):
            await collect(engine, make_request("Hello", max_tokens=10, temperature=0.0, ignore_eos=True))
    finally:
        del engine._logits_mask
    deltas = [first] + [d async for d in healthy]
    assert deltas[-1].completion_tokens == 10 and deltas[-1].finish_reason == "length"
    engine.check_health()
    await _wait_idle(engine)


async def test_closing_the_stream_cancels_and_frees_the_slot(engine):
    stream = engine.generate(make_request("Once upon a time", max_tokens=200, temperature=1.0, ignore_eos=True))
    for _ in range(3):
        await stream.__anext__()
    assert engine.stats().running == 1
    await stream.aclose()
    await _wait_idle(engine)
    deltas, text, ids = await collect(engine, make_request("Hello", max_tokens=4, temperature=0.0))
    assert (text, deltas[-1].finish_reason, len(ids)) == ("! I I I", "length", 4)


async def test_cancelling_the_consumer_task_cancels_the_request(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(make_request("Hello world", max_tokens=240, temperature=0.0, ignore_eos=True)):
            started.set()

    task = asyncio.ensure_future(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(engine)
    assert not engine._manager.output_router.result_handlers
    assert not engine._processor.slots


# -- scoring, stats ------------------------------------------------------------------------------


def _manual_logprob(model, tokenizer, prompt, continuation):
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + continuation)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, full[i]].item() for i in range(start, len(full)))


async def test_score_ranks_the_likely_continuation_first_and_matches_a_manual_computation(
    engine, reference_model, tokenizer
):
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    likely, unlikely = "The capital of France is Paris.", "Bananas are purple, 龘!"
    scores = await engine.score(prompt, [likely, unlikely, ""])
    assert scores[0] > scores[1]
    assert scores[2] == 0.0
    for score, continuation in zip(scores, [likely, unlikely]):
        assert score == pytest.approx(_manual_logprob(reference_model, tokenizer, prompt, continuation), abs=1e-3)


async def test_score_runs_alongside_generation(engine, reference_model, tokenizer):
    prompt, continuations = chat_prompt(tokenizer, "What color is grass?"), ["Grass is green.", "Grass is blue."]
    idle = await engine.score(prompt, continuations)
    story = chat_prompt(tokenizer, "Tell me a story.")
    stream = asyncio.ensure_future(collect(engine, make_request(story, max_tokens=120, temperature=0.0, ignore_eos=True)))
    await asyncio.sleep(0.05)
    assert engine.stats().running == 1
    busy = [await engine.score(prompt, continuations) for _ in range(5)]
    _, _, ids = await stream
    assert all(b == pytest.approx(idle, abs=1e-4) for b in busy)
    assert await engine.score(prompt, continuations) == pytest.approx(idle, abs=1e-4)
    assert ids == _hf_greedy(reference_model, tokenizer, story, 120)


def _manual_token_logprobs(model, ids):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [None] + [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


async def test_prompt_logprobs_match_a_manual_forward_of_each_sequence(engine, reference_model, tokenizer):
    sequences = [
        tokenizer(chat_prompt(tokenizer, "What is the capital of France?") + "The capital of France is Paris.")["input_ids"],
        tokenizer("Hello")["input_ids"] + [7, 300, 12],  # unlikely tokens too
        tokenizer("中国的首都是哪里？")["input_ids"],
        [5],
        [],
    ]
    assert len({len(ids) for ids in sequences[:3]}) == 3  # one padded batch of different lengths
    result = await engine.prompt_logprobs(sequences)
    assert [len(lps) for lps in result] == [len(ids) for ids in sequences]
    assert result[3] == [None] and result[4] == []
    for got, ids in zip(result[:3], sequences[:3]):
        want = _manual_token_logprobs(reference_model, ids)
        assert got[0] is None and all(isinstance(lp, float) and lp <= 0 for lp in got[1:])
        assert got[1:] == pytest.approx(want[1:], abs=1e-4)


async def test_prompt_logprobs_agree_with_score(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "What color is grass?")
    continuations = ["Grass is green.", "Grass is blue.", "Bananas are purple, 龘!"]
    scores = await engine.score(prompt, continuations)
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = [tokenizer(prompt + c)["input_ids"] for c in continuations]
    logprobs = await engine.prompt_logprobs(full)
    for score, ids, lps in zip(scores, full, logprobs):
        start = next(i for i, (a, b) in enumerate(zip(prompt_ids + [None], ids)) if a != b)
        assert score == pytest.approx(sum(lps[start:]), abs=1e-4)
    assert scores[0] > scores[1] > scores[2]


async def test_prompt_logprobs_split_over_several_forward_passes_are_the_same(engine, tokenizer, monkeypatch):
    sequences = [tokenizer(chat_prompt(tokenizer, q))["input_ids"] for q in QUESTIONS[:6]]
    forwards = []
    forward = engine._forward_logprobs

    def spy(all_sequences, rows, results):
        forwards.append(list(rows))
        return forward(all_sequences, rows, results)

    monkeypatch.setattr(engine, "_forward_logprobs", spy)
    together = await engine.prompt_logprobs(sequences)
    assert len(forwards) == 1
    forwards.clear()
    monkeypatch.setattr(transformers_engine, "_LOGPROB_BATCH_TOKENS", max(len(ids) for ids in sequences) + 1)
    apart = await engine.prompt_logprobs(sequences)
    assert len(forwards) == len(sequences) and sorted(i for rows in forwards for i in rows) == list(range(6))
    for a, b in zip(together, apart):
        assert a[0] is None and b[0] is None and b[1:] == pytest.approx(a[1:], abs=1e-4)


async def test_prompt_logprobs_run_alongside_generation(engine, tokenizer):
    sequences = [tokenizer(chat_prompt(tokenizer, "What color is grass?") + "Grass is green.")["input_ids"]]
    idle = await engine.prompt_logprobs(sequences)
    story = chat_prompt(tokenizer, "Tell me a story.")
    alone = (await collect(engine, make_request(story, max_tokens=80, temperature=0.0, ignore_eos=True)))[2]
    stream = asyncio.ensure_future(collect(engine, make_request(story, max_tokens=80, temperature=0.0, ignore_eos=True)))
    await asyncio.sleep(0.05)
    busy = [await engine.prompt_logprobs(sequences) for _ in range(3)]
    assert (await stream)[2] == alone
    for result in busy:
        assert result[0][0] is None and result[0][1:] == pytest.approx(idle[0][1:], abs=1e-4)


async def test_prompt_logprobs_validate_lengths_and_token_ids(engine):
    with pytest.raises(PromptTooLongError) as e:
        await engine.prompt_logprobs([[5, 6], [5] * 257])
    assert (e.value.prompt_tokens, e.value.max_model_len) == (257, 256)
    for bad in ([[5, engine._vocab_size]], [[5, -1]], [["a"]], [[True, 5]], [5], "abc"):
        with pytest.raises(ValueError, match="token"):
            await engine.prompt_logprobs(bad)
    assert await engine.prompt_logprobs([]) == []


async def test_stats_shape_and_load(engine):
    s = engine.stats()
    assert set(s.to_dict()) == {"running", "waiting", "kv_cache_usage", "tokens_per_s", "healthy", "prompt_tokens", "cached_prompt_tokens"}
    assert s.healthy is True
    stream = engine.generate(make_request("Once upon a time", max_tokens=150, temperature=0.0, ignore_eos=True))
    for _ in range(5):
        await stream.__anext__()
    busy = engine.stats()
    await stream.aclose()
    assert busy.running == 1 and 0.0 < busy.kv_cache_usage <= 1.0 and busy.tokens_per_s > 0
    assert (await _wait_idle(engine)).kv_cache_usage == 0.0


async def test_kv_cache_pressure_preempts_requests_without_changing_outputs(model_path, reference_model, tokenizer):
    # 24 blocks of 16 tokens hold ~6 of these 20 requests: the manager evicts requests and re-prefills them
    # later, which must change neither greedy outputs nor seeded samples.
    args = {"max_model_len": 256, "block_size": 16, "num_blocks": 24, "max_batch_tokens": 64, "num_threads": 1}
    eng = TransformersEngine(model_path, args)
    await eng.start()
    try:
        prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS[:20]]
        greedy = await asyncio.gather(
            *(collect(eng, make_request(p, max_tokens=32, temperature=0.0, ignore_eos=True)) for p in prompts)
        )
        assert [ids for _, _, ids in greedy] == [_hf_greedy(reference_model, tokenizer, p, 32) for p in prompts]
        sampled = dict(max_tokens=32, temperature=1.5, seed=5, ignore_eos=True)
        alone = (await collect(eng, make_request(prompts[0], **sampled)))[2]
        crowded = await asyncio.gather(*(collect(eng, make_request(p, **sampled)) for p in prompts))
        assert crowded[0][2] == alone
    finally:
        await eng.shutdown()


async def test_a_dead_loop_fails_streams_and_health(model_path):
    eng = TransformersEngine(model_path, {"max_num_seqs": 4, "max_model_len": 256, "num_blocks": 8, "block_size": 32})
    await eng.start()
    try:
        eng.check_health()

        def crash(requests_with_new_token):
            raise RuntimeError("loop crashed")

        eng._processor.prepare_tensor_args = crash
        with pytest.raises(EngineError, match="loop crashed"):
            await collect(eng, make_request("Hello", max_tokens=5))
        # The manager fails the requests first and records its fatal error right after.
        for _ in range(100):
            if not eng.stats().healthy:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(EngineError, match="died"):
            eng.check_health()
        with pytest.raises(EngineError):
            await collect(eng, make_request("Hello", max_tokens=5))
    finally:
        await eng.shutdown()


def test_decode_attention_equals_the_managers_masked_attention():
    """A decode step of 5 requests with different cache lengths and grouped-query heads: each
    request's own keys only, exactly as SDPA over the whole packed batch with the manager's
    block-diagonal mask computes it."""
    from deployments.engines.transformers_attention import decode_attention

    gen = torch.Generator().manual_seed(0)
    k_lens = [7, 1, 30, 12, 3]
    heads, kv_heads, dim, batch = 4, 2, 16, len(k_lens)
    cu_k = torch.tensor([0, *itertools.accumulate(k_lens)])
    cu_q = torch.arange(batch + 1)
    query = torch.randn(1, heads, batch, dim, generator=gen)
    key = torch.randn(1, kv_heads, int(cu_k[-1]), dim, generator=gen)
    value = torch.randn(1, kv_heads, int(cu_k[-1]), dim, generator=gen)

    mask = torch.full((1, 1, batch, int(cu_k[-1])), torch.finfo(torch.float32).min)
    for i in range(batch):
        mask[0, 0, i, cu_k[i] : cu_k[i + 1]] = 0
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.25
    ).transpose(1, 2)  # [1, B, H, D]

    got = decode_attention(query, key, value, cu_q, cu_k, 0.25)
    assert got.shape == (1, batch, heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # A step that also prefills (a request with 3 queries) is not a decode step: left to transformers.
    assert decode_attention(torch.randn(1, heads, 7, dim), key, value, torch.tensor([0, 1, 4, 5, 6, 7]), cu_k, 0.25) is None
