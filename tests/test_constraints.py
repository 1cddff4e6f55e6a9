"""Constrained decoding (regex, JSON schema) with xgrammar: the per-request mask alone, then in the engine."""

import asyncio
import gc
import json
import math
import re
import threading
import time
import weakref

import jsonschema
import pytest
import torch
import xgrammar as xgr
from sglang.lang.ir import REGEX_INT

from deployments.models.corpus import CHAT_PAIRS
from deployments.engines.constraints import GrammarConstraints, GrammarMask, apply_bitmask_torch
from tests.engine_helpers import chat_prompt, collect, make_request, record_batch_rows
from deployments.engines.engine import JSON_OBJECT_SCHEMA
from deployments.engines.transformers_engine import TransformersEngine

QUESTIONS = [q for q, _ in CHAT_PAIRS]
PHONE = r"[0-9]{3}-[0-9]{2}"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def constraints(tokenizer):
    return GrammarConstraints(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


async def _wait_idle(engine, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        s = engine.stats()
        if s.running == 0 and s.waiting == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def _assert_finished_match(tokenizer, deltas, text, ids, pattern):
    """The request ended on EOS ("stop") and its text is a full match, streamed piece by piece."""
    assert re.fullmatch(pattern, text), text
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", None)
    assert ids[-1] == tokenizer.eos_token_id and deltas[-1].completion_tokens == len(ids)
    assert text == tokenizer.decode(ids[:-1], skip_special_tokens=True)


# -- the mask alone (no engine) ------------------------------------------------------------------


def _allowed(mask, vocab, completion_ids):
    logits = torch.zeros(vocab)
    mask.apply(logits, completion_ids)
    return torch.isfinite(logits)


def _decode_with_random_logits(mask, tokenizer, vocab, steps, seed):
    """Picks argmax(random logits) under the mask until EOS: a stand-in for the engine's loop."""
    generator = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(steps):
        logits = torch.randn(vocab, generator=generator)
        mask.apply(logits, ids)
        token = int(logits.argmax())
        assert math.isfinite(logits[token])
        ids.append(token)
        if token == tokenizer.eos_token_id:
            break
    return ids


def test_mask_only_allows_what_the_regex_can_still_match(constraints, tokenizer):
    vocab = len(tokenizer)
    for seed in range(5):
        mask = constraints.mask(constraints.compile(regex=PHONE))
        ids = _decode_with_random_logits(mask, tokenizer, vocab, 20, seed)
        assert ids[-1] == tokenizer.eos_token_id
        assert re.fullmatch(PHONE, tokenizer.decode(ids[:-1]))
    mask = constraints.mask(constraints.compile(regex=PHONE))
    first = _allowed(mask, vocab, [])
    allowed_text = {tokenizer.decode([t]) for t in first.nonzero().flatten().tolist()}
    assert allowed_text and all(re.fullmatch(r"[0-9]{1,3}(-[0-9]{0,2})?", s) for s in allowed_text)
    assert not first[tokenizer.eos_token_id]


def test_mask_allows_only_eos_once_the_grammar_is_complete_and_after_it(constraints, tokenizer):
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    ids = tokenizer("123-45", add_special_tokens=False)["input_ids"]
    mask = constraints.mask(constraints.compile(regex=PHONE))
    complete = _allowed(mask, vocab, ids)
    assert complete.nonzero().flatten().tolist() == [eos] and mask.is_completed
    # Past the end (EOS not ending the request, e.g. ignore_eos): still EOS only.
    assert _allowed(mask, vocab, ids + [eos]).nonzero().flatten().tolist() == [eos] and mask.is_terminated
    assert _allowed(mask, vocab, ids + [eos, eos]).nonzero().flatten().tolist() == [eos]


def test_mask_follows_the_completion_it_is_given_not_its_history(constraints, tokenizer):
    """Repeated positions (a discarded sample, a re-prefilled request) and diverging completions roll the
    matcher back, so the mask always equals a fresh matcher's for the same completion."""
    vocab = len(tokenizer)
    grammar = constraints.compile(json_schema=json.dumps(PERSON))
    a = tokenizer('{"name": "Al", "age": 4', add_special_tokens=False)["input_ids"]
    b = tokenizer('{"name": "Bo", "age": 1', add_special_tokens=False)["input_ids"]
    mask = constraints.mask(grammar)
    for completion in (a[:3], a[:3], a, a[:2], b, b[:4], [], a[:1], a):
        fresh = xgr.GrammarMatcher(grammar)  # the reference: a matcher fed the completion in one go
        assert all(fresh.accept_token(t) for t in completion)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        fresh.fill_next_token_bitmask(bitmask)
        want = torch.zeros(vocab)
        xgr.apply_token_bitmask_inplace(want, bitmask[0], vocab_size=vocab)
        assert torch.equal(_allowed(mask, vocab, completion), torch.isfinite(want)), completion


def test_the_plain_torch_bitmask_path_equals_xgrammars_kernel(constraints, tokenizer):
    """Off-CPU logits take the plain-torch path; on CPU both must agree bit for bit."""
    vocab = len(tokenizer)
    matcher = xgr.GrammarMatcher(constraints.compile(json_schema=json.dumps(PERSON)))
    matcher.accept_string('{"name": "A')
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    assert matcher.fill_next_token_bitmask(bitmask)
    logits = torch.randn(vocab)
    kernel, plain = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(kernel, bitmask[0], vocab_size=vocab)
    apply_bitmask_torch(plain, bitmask[0])
    assert torch.equal(kernel, plain) and 0 < int(torch.isfinite(plain).sum()) < vocab


def test_a_token_outside_the_grammar_fails_the_mask(constraints, tokenizer):
    mask = constraints.mask(constraints.compile(regex=PHONE))
    with pytest.raises(RuntimeError, match="does not match"):
        mask.apply(torch.zeros(len(tokenizer)), tokenizer("ab", add_special_tokens=False)["input_ids"])


def test_json_object_mode_is_any_object_and_nothing_else(constraints, tokenizer):
    grammar = constraints.compile(json_schema=JSON_OBJECT_SCHEMA)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    for text in ['{}', '{"a": 1, "b": [true, null, "x"], "c": {"d": -2.5}}']:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        mask = constraints.mask(grammar)
        for i, token in enumerate(ids):
            assert _allowed(mask, vocab, ids[:i])[token], (text, i)
        assert _allowed(mask, vocab, ids)[eos]
    assert not _allowed(constraints.mask(grammar), vocab, [])[tokenizer("[", add_special_tokens=False)["input_ids"][0]]


def test_schema_properties_are_enforced(constraints, tokenizer):
    vocab = len(tokenizer)
    mask = constraints.mask(constraints.compile(json_schema=json.dumps(PERSON)))
    for seed in range(3):
        mask = constraints.mask(constraints.compile(json_schema=json.dumps(PERSON)))
        ids = _decode_with_random_logits(mask, tokenizer, vocab, 60, seed)
        assert ids[-1] == tokenizer.eos_token_id
        # strict=False: xgrammar's JSON string rule admits raw control characters (e.g. a newline
        # token) inside strings, which strict JSON forbids; random logits pick such tokens.
        jsonschema.validate(json.loads(tokenizer.decode(ids[:-1]), strict=False), PERSON)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"regex": "[0-9"}, r"invalid regex '\[0-9': .*Unclosed"),
        ({"regex": "a{2,1}"}, "invalid regex"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"regex": 5}, "regex must be a non-empty string"),
        ({"json_schema": "{"}, "json_schema is not valid JSON"),
        ({"json_schema": "[1, 2]"}, "must be a JSON object"),
        ({"json_schema": {"type": "object"}}, "as a JSON string"),
        ({"json_schema": '{"type": "nonsense"}'}, 'invalid json_schema: Unsupported type "nonsense"'),
        ({"json_schema": '{"$ref": "#/nowhere"}'}, "invalid json_schema"),
        ({"regex": "a", "json_schema": "{}"}, "at most one of regex and json_schema"),
    ],
)
def test_invalid_constraints_are_value_errors_with_a_clear_message(constraints, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        constraints.compile(**kwargs)
    assert ".cc:" not in str(e.value) and "Check failed" not in str(e.value)


def test_one_compiler_per_engine_and_no_constraint_is_none(constraints):
    assert constraints.compiler() is constraints.compiler()
    assert constraints.compile() is None


# -- in the engine ---------------------------------------------------------------------------------


async def test_regex_is_fully_matched(engine, tokenizer):
    for question in QUESTIONS[:3]:
        request = make_request(chat_prompt(tokenizer, question), max_tokens=20, temperature=0.0, regex=PHONE)
        deltas, text, ids = await collect(engine, request)
        _assert_finished_match(tokenizer, deltas, text, ids, PHONE)


async def test_sglang_integer_regex_gives_an_int(engine, tokenizer):
    # The tiny model's greedy answers, held to the integer rule (which allows trailing whitespace), for
    # questions whose constrained answer ends on EOS within max_tokens: one with trailing whitespace, one without.
    expected = {"How old are you?": ("20   \n ", 20), "Describe the ocean.": ("2207", 2207)}
    for question, (want_text, want_int) in expected.items():
        request = make_request(chat_prompt(tokenizer, question), max_tokens=16, temperature=0.0, regex=REGEX_INT)
        deltas, text, ids = await collect(engine, request)
        assert re.fullmatch(REGEX_INT, text), text
        assert (text, int(text), deltas[-1].finish_reason) == (want_text, want_int, "stop")


async def test_json_schema_output_validates(engine, tokenizer):
    for question in ["What is your name?", "How old are you?"]:
        deltas, text, ids = await collect(
            engine, make_request(chat_prompt(tokenizer, question), max_tokens=60, temperature=0.0, json_schema=json.dumps(PERSON))
        )
        assert (deltas[-1].finish_reason, ids[-1]) == ("stop", tokenizer.eos_token_id), text
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        assert set(value) == {"name", "age"}


async def test_json_object_mode_holds_the_model_to_an_object(engine, tokenizer, constraints):
    # The tiny model never closes a free-form JSON string by itself, so the request ends at
    # max_tokens; what is checked is that every generated token kept the output a valid prefix of a
    # JSON object. (Complete objects under json_object mode: the mask-level tests above.)
    request = make_request("Hello", max_tokens=40, temperature=0.0, json_schema=JSON_OBJECT_SCHEMA)
    deltas, text, ids = await collect(engine, request)
    assert text.startswith("{") and deltas[-1].finish_reason == "length"
    matcher = xgr.GrammarMatcher(constraints.compile(json_schema=JSON_OBJECT_SCHEMA))
    assert all(matcher.accept_token(t) for t in ids)


async def test_streamed_deltas_add_up_to_the_matched_text(engine, tokenizer):
    schema = json.dumps(PERSON)
    request = make_request(chat_prompt(tokenizer, "Tell me a story."), max_tokens=60, temperature=0.0, json_schema=schema)
    stream = [d async for d in engine.generate(request)]
    assert len(stream) > 5  # really streamed, one token at a time
    assert all(d.finish_reason is None for d in stream[:-1])
    text = "".join(d.text for d in stream)
    ids = [t for d in stream for t in d.token_ids]
    assert text == tokenizer.decode(ids[:-1], skip_special_tokens=True)
    jsonschema.validate(json.loads(text), PERSON)
    assert [d.completion_tokens for d in stream] == sorted(d.completion_tokens for d in stream)


async def test_constrained_and_unconstrained_requests_share_batches(engine, tokenizer, monkeypatch):
    schema = json.dumps(PERSON)
    requests = [
        make_request(chat_prompt(tokenizer, QUESTIONS[0]), max_tokens=20, temperature=0.0, regex=PHONE),
        make_request(chat_prompt(tokenizer, QUESTIONS[1]), max_tokens=60, temperature=0.0, json_schema=schema),
        make_request(chat_prompt(tokenizer, QUESTIONS[2]), max_tokens=60, temperature=1.0, seed=7, json_schema=schema),
        make_request(chat_prompt(tokenizer, QUESTIONS[3]), max_tokens=24, temperature=0.0, ignore_eos=True),
        make_request(chat_prompt(tokenizer, QUESTIONS[4]), max_tokens=24, temperature=1.2, seed=3, ignore_eos=True),
        make_request(chat_prompt(tokenizer, QUESTIONS[5]), max_tokens=16, temperature=0.0, regex=REGEX_INT),
    ]
    alone = [(await collect(engine, r))[2] for r in requests]
    rows_per_step = record_batch_rows(engine, monkeypatch)
    together = await asyncio.gather(*(collect(engine, r) for r in requests))
    assert max(rows_per_step) == len(requests)
    assert [ids for _, _, ids in together] == alone
    _assert_finished_match(tokenizer, *together[0], PHONE)
    for deltas, text, _ in together[1:3]:
        assert deltas[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    assert all(deltas[-1].finish_reason == "length" for deltas, _, _ in together[3:5])
    assert re.fullmatch(REGEX_INT, together[5][1])
    await _wait_idle(engine)


async def test_sampled_constrained_requests_match_and_are_reproducible(engine, tokenizer):
    prompt = chat_prompt(tokenizer, "Tell me a story.")
    texts = set()
    for seed in range(4):
        request = make_request(prompt, max_tokens=20, temperature=1.0, seed=seed, regex=PHONE)
        deltas, text, ids = await collect(engine, request)
        _assert_finished_match(tokenizer, deltas, text, ids, PHONE)
        assert (await collect(engine, request))[2] == ids
        texts.add(text)
    assert len(texts) > 1  # really sampled
    hot = make_request(prompt, max_tokens=60, temperature=1.5, top_k=50, top_p=0.9, seed=1, json_schema=json.dumps(PERSON))
    deltas, text, _ = await collect(engine, hot)
    assert deltas[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


async def test_ignore_eos_keeps_the_match_and_pads_with_eos_to_max_tokens(engine, tokenizer):
    request = make_request("Hello", max_tokens=12, temperature=0.0, regex=PHONE, ignore_eos=True)
    deltas, text, ids = await collect(engine, request)
    assert re.fullmatch(PHONE, text) and deltas[-1].finish_reason == "length" and len(ids) == 12
    assert tokenizer.decode(ids[: ids.index(tokenizer.eos_token_id)]) == text
    assert set(ids[ids.index(tokenizer.eos_token_id) :]) == {tokenizer.eos_token_id}


async def test_bad_constraints_fail_before_the_request_is_queued(engine, monkeypatch):
    added = []
    add_request = engine._manager.add_request

    def spy(*args, **kwargs):
        added.append(kwargs.get("request_id"))
        return add_request(*args, **kwargs)

    monkeypatch.setattr(engine._manager, "add_request", spy)
    cases = [
        ({"regex": "([0-9]"}, "invalid regex"),
        ({"json_schema": '{"type": "object", "properties": {"a": {"type": "strange"}}}'}, "invalid json_schema"),
        ({"json_schema": "{'single': 'quotes'}"}, "not valid JSON"),
        ({"regex": "[0-9]", "json_schema": JSON_OBJECT_SCHEMA}, "at most one"),
    ]
    for sampling, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            await collect(engine, make_request("Hello", max_tokens=8, **sampling))
    assert added == []
    assert not engine._processor.slots and not engine._manager.output_router.result_handlers
    deltas, text, ids = await collect(engine, make_request("Hello", max_tokens=8, temperature=0.0, regex=PHONE))
    assert re.fullmatch(PHONE, text) and len(added) == 1


async def test_grammars_compile_off_the_event_loop_once(engine, monkeypatch):
    constraints = engine._constraints
    threads = []
    compile_ = constraints.compile

    def spy(**kwargs):
        threads.append(threading.current_thread())
        return compile_(**kwargs)

    monkeypatch.setattr(constraints, "compile", spy)
    await collect(engine, make_request("Hello", max_tokens=8, temperature=0.0, regex=r"[a-c]{4}"))
    await collect(engine, make_request("Hi", max_tokens=8, temperature=0.0, regex=r"[a-c]{4}"))
    assert len(threads) == 2 and threading.main_thread() not in threads
    assert constraints.compiler().get_cache_size_bytes() > 0


async def test_closing_a_constrained_stream_frees_everything(engine, tokenizer):
    masks = []
    logits_mask = engine._logits_mask

    async def keep(request):
        mask = await logits_mask(request)
        masks.append(weakref.ref(mask))
        return mask

    engine._logits_mask = keep
    try:
        long_number = make_request("Once upon a time", max_tokens=200, temperature=1.0, regex=r"[0-9]{150,}")
        stream = engine.generate(long_number)
        for _ in range(3):
            await stream.__anext__()
        assert engine.stats().running == 1 and isinstance(masks[0](), GrammarMask)
        await stream.aclose()
    finally:
        del engine._logits_mask
    await _wait_idle(engine)
    assert not engine._processor.slots and not engine._manager.output_router.result_handlers
    gc.collect()
    assert masks[0]() is None
    deltas, text, ids = await collect(engine, make_request("Hello", max_tokens=20, temperature=0.0, regex=PHONE))
    _assert_finished_match(tokenizer, deltas, text, ids, PHONE)


async def test_cancelling_a_constrained_consumer_task_frees_its_slot(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(make_request("Hello world", max_tokens=200, temperature=0.0, regex=r"[0-9 ]{150,}")):
            started.set()

    task = asyncio.ensure_future(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(engine)
    assert not engine._processor.slots and not engine._manager.output_router.result_handlers


async def test_constrained_requests_survive_kv_cache_eviction(model_path, tokenizer):
    """A tight KV cache makes the manager evict requests and re-prefill them later (their generated tokens
    become part of the prompt): the masks must follow, leaving outputs exactly as when run alone."""
    args = {"max_model_len": 256, "block_size": 16, "num_blocks": 24, "max_batch_tokens": 64, "num_threads": 1}
    eng = TransformersEngine(model_path, args)
    await eng.start()
    reprefilled = set()
    prepare = eng._processor.prepare_tensor_args

    def spy(requests_with_new_token):
        for future_state in requests_with_new_token:
            state = future_state.state
            slot = eng._processor.slots.get(state.logit_processor_kwargs.get("tandem_slot", -1))
            if slot is not None and slot.logits_mask is not None and len(state.initial_tokens) > slot.prompt_len:
                reprefilled.add(state.request_id)
        return prepare(requests_with_new_token)

    try:
        digits = r"[0-9]{24}"
        constrained = [
            make_request(chat_prompt(tokenizer, q), request_id=f"c{i}", max_tokens=40, temperature=t, seed=i, regex=digits)
            for i, (q, t) in enumerate(zip(QUESTIONS[:8], [0.0, 1.0] * 4))
        ]
        alone = [(await collect(eng, r))[2] for r in constrained]
        eng._processor.prepare_tensor_args = spy
        noise = [make_request(chat_prompt(tokenizer, q), max_tokens=32, temperature=0.0, ignore_eos=True) for q in QUESTIONS[8:20]]
        results = await asyncio.gather(*(collect(eng, r) for r in constrained + noise))
        assert reprefilled  # the scenario really happened
        for (deltas, text, ids), want in zip(results, alone):
            assert ids == want
            _assert_finished_match(tokenizer, deltas, text, ids, digits)
    finally:
        await eng.shutdown()


async def test_a_grammar_that_compiles_too_slowly_is_refused_and_the_loop_stays_free(tokenizer):
    # A thousand optional properties take xgrammar seconds (its time grows fast with them).
    slow = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)}})
    constraints = GrammarConstraints(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        await constraints.compile_within(0.5, json_schema=slow)
    elapsed = time.monotonic() - start
    task.cancel()
    assert str(info.value) == (
        "the json_schema constraint did not compile within 0.5 s (engine_args.grammar_compile_timeout_s); "
        "simplify it (e.g. fewer optional properties or enum values)"
    )
    assert 0.5 <= elapsed < 1.5, elapsed
    assert ticks >= 25, ticks  # the event loop kept running while it compiled
    # A simple grammar still compiles within its time.
    assert await constraints.compile_within(5, regex="[0-9]+") is not None
