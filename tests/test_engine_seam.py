"""What the `Engine` base class does for every adapter: prompt -> ids and its checks, the context-fit check,
`prompt_logprobs`' input checks, `score` on top of an engine's `prompt_logprobs`, health from one hook, and the
tokens/s meter. A small fake engine with a one-token-per-character tokenizer makes every number exact."""

from __future__ import annotations

import pickle

import pytest

from deployments.engines.engine import (
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    PromptTooLongError,
    RateMeter,
    SamplingParams,
)

BOS = 1


class CharTokenizer:
    """One token per character (its code point), after a BOS unless add_special_tokens=False."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([BOS] if add_special_tokens else []) + [ord(c) for c in text]}

    def get_vocab(self) -> dict:
        return {chr(i): i for i in range(128)} | {"<longest>": 0}


class FakeEngine(Engine):
    """Token t at any position has log-prob -t / 64 (exact in binary); `error` is what the health hook says."""

    name = "fake"

    def __init__(self, max_model_len: int = 16, tokenizer=CharTokenizer(), vocab_size: int = 128):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len
        self.error: str | None = None
        self.asked: list[list[list[int]]] = []  # what prompt_logprobs was given

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request):
        raise NotImplementedError

    async def prompt_logprobs(self, token_ids):
        self.check_health()
        sequences = self._logprob_sequences(token_ids)
        self.asked.append(sequences)
        return [[None if i == 0 else -t / 64 for i, t in enumerate(ids)] for ids in sequences]

    def stats(self) -> EngineStats:
        return EngineStats(healthy=self.healthy())

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _health_error(self) -> str | None:
        return self.error


def request(prompt=None, ids=None) -> GenerationRequest:
    return GenerationRequest("r", SamplingParams(), prompt=prompt, prompt_token_ids=ids)


# -- score on top of prompt_logprobs -------------------------------------------------------------


async def test_score_sums_the_continuation_logprobs_of_prompt_logprobs():
    engine = FakeEngine()
    scores = await engine.score("ab", ["c", "de", ""])
    # [BOS, a, b] + "c": only "c" (99) is scored; "de": 100 + 101; "": nothing.
    assert scores == [-99 / 64, -201 / 64, 0.0]
    assert engine.asked == [[[BOS, 97, 98, 99], [BOS, 97, 98, 100, 101], [BOS, 97, 98]]]


async def test_score_checks_its_input_and_lengths_before_asking_the_engine():
    engine = FakeEngine(max_model_len=6)
    assert await engine.score("ab", []) == []
    with pytest.raises(ValueError, match="^prompt and continuations must be strings$"):
        await engine.score("ab", ["c", 5])
    assert await engine.score("ab", ["cde"]) == [-(99 + 100 + 101) / 64]  # 6 tokens: fits
    with pytest.raises(PromptTooLongError) as info:
        await engine.score("ab", ["c", "defg"])  # 7 tokens
    assert (info.value.prompt_tokens, info.value.max_model_len, info.value.max_tokens) == (7, 6, None)
    assert engine.asked == [[[BOS, 97, 98, 99, 100, 101]]]  # the long one never reached prompt_logprobs

    # An engine that scores a sequence as a prompt of one more step needs one token of headroom.
    engine.scoring_headroom = 1
    with pytest.raises(PromptTooLongError) as info:
        await engine.score("ab", ["cde"])
    assert (info.value.prompt_tokens, info.value.max_model_len) == (6, 6)


async def test_score_without_a_tokenizer_is_an_engine_error():
    with pytest.raises(EngineError, match="^the fake engine has no tokenizer to score text$"):
        await FakeEngine(tokenizer=None).score("ab", ["c"])


# -- prompt -> ids, context fit, prompt_logprobs input ----------------------------------------


async def test_prompt_token_ids_and_their_messages():
    engine = FakeEngine()
    assert await engine._prompt_token_ids(request(prompt="hi")) == [BOS, 104, 105]
    assert await engine._prompt_token_ids(request(ids=[0, 5, 127])) == [0, 5, 127]
    for bad, message in [
        (request(), "give exactly one of prompt and prompt_token_ids"),
        (request(prompt="hi", ids=[5]), "give exactly one of prompt and prompt_token_ids"),
        (request(ids=[5, 128]), r"prompt_token_ids must be token ids in \[0, 128\)"),
        (request(ids=[-1]), r"prompt_token_ids must be token ids in \[0, 128\)"),
        (request(ids=[True]), r"prompt_token_ids must be token ids in \[0, 128\)"),
        (request(ids=[5.0]), r"prompt_token_ids must be token ids in \[0, 128\)"),
        (request(ids=[]), "the prompt is empty"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            await engine._prompt_token_ids(bad)
    with pytest.raises(EngineError, match="^the fake engine has no tokenizer for prompt text$"):
        await FakeEngine(tokenizer=None)._prompt_token_ids(request(prompt="hi"))


class CountingTokenizer(CharTokenizer):
    def __init__(self):
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        self.calls += 1
        return super().__call__(text, add_special_tokens)


async def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing():
    # The longest token ("<longest>") has 9 characters: 16 tokens hold at most 144 characters.
    tokenizer = CountingTokenizer()
    engine = FakeEngine(max_model_len=16, tokenizer=tokenizer)
    with pytest.raises(PromptTooLongError) as info:
        await engine._prompt_token_ids(request(prompt="a" * 145))
    assert str(info.value) == (
        "This model's maximum context length is 16 tokens, but the prompt has 145 characters, "
        "more than 16 tokens of this model can hold."
    )
    assert tokenizer.calls == 0
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.prompt_tokens, copy.prompt_chars, str(copy)) == (None, 145, str(info.value))
    # 144 characters may fit (they don't here: tokenized, they are 145 tokens, and _check_fits says so).
    assert len(await engine._prompt_token_ids(request(prompt="a" * 144))) == 145
    assert tokenizer.calls == 1
    # Token ids: refused on their count before each id is checked.
    with pytest.raises(PromptTooLongError, match="the prompt has 17 tokens"):
        await engine._prompt_token_ids(request(ids=["not an id"] * 17))
    # score() bounds prompt + its longest continuation the same way.
    with pytest.raises(PromptTooLongError, match="the prompt has 150 characters"):
        await engine.score("a" * 140, ["b", "c" * 10])
    assert tokenizer.calls == 1


def test_context_fit_names_both_numbers_and_crosses_processes():
    engine = FakeEngine(max_model_len=16)
    engine._check_fits(12, 4)
    with pytest.raises(PromptTooLongError) as info:
        engine._check_fits(12, 5)
    assert str(info.value) == (
        "This model's maximum context length is 16 tokens, but 17 tokens were requested (12 in the prompt, "
        "5 for the completion). Reduce the prompt or max_tokens."
    )
    with pytest.raises(PromptTooLongError) as info:
        engine._check_fits(17)
    assert str(info.value) == "This model's maximum context length is 16 tokens, but the prompt has 17 tokens."
    copy = pickle.loads(pickle.dumps(PromptTooLongError(12, 16, 5)))
    assert (type(copy), copy.prompt_tokens, copy.max_model_len, copy.max_tokens) == (PromptTooLongError, 12, 16, 5)


def test_prompt_logprobs_input_checks():
    engine = FakeEngine(max_model_len=4)
    assert engine._logprob_sequences(([5, 6], (7,), [])) == [[5, 6], [7], []]
    for bad in ([5], "abc", [[5, "a"]], [[5, 128]], [[False]]):
        with pytest.raises(ValueError, match="^token_ids must be"):
            engine._logprob_sequences(bad)
    with pytest.raises(PromptTooLongError) as info:
        engine._logprob_sequences([[5], [5] * 5])
    assert (info.value.prompt_tokens, info.value.max_model_len) == (5, 4)


# -- health --------------------------------------------------------------------------------------


async def test_health_comes_from_one_hook():
    engine = FakeEngine()
    engine.check_health()
    assert (engine.healthy(), engine.stats().healthy) == (True, True)
    engine.error = engine._not_started()
    assert engine.error == "the fake engine is not started"
    with pytest.raises(EngineError, match="^the fake engine is not started$"):
        engine.check_health()
    engine.error = "the decode loop died"
    assert (engine.healthy(), engine.stats().healthy) == (False, False)
    with pytest.raises(EngineError, match="^the decode loop died$"):
        await engine.score("ab", ["c"])
    assert engine.asked == []


# -- the tokens/s meter --------------------------------------------------------------------------


def test_rate_meter_counts_a_sliding_window():
    now = [100.0]
    meter = RateMeter(window_s=4.0, clock=lambda: now[0])
    meter.add(6)
    meter.add(0)
    meter.add(-3)  # nothing to count
    now[0] = 102.0
    meter.add(2)
    assert meter.rate() == 2.0  # (6 + 2) / 4
    now[0] = 104.5  # the first event left the window
    assert meter.rate() == 0.5
    now[0] = 106.5
    assert meter.rate() == 0.0
