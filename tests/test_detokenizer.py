"""Incremental detokenization (UTF-8 safe), stop-string holdback, and `DeltaMapper`: token ids -> Deltas,
the same for every engine."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deployments.engines.engine import SamplingParams
from deployments.engines.text import DeltaMapper, IncrementalDetokenizer, StopStringMatcher

# Characters outside the training text stay raw bytes: 3 byte-tokens per CJK character, 4 per emoji.
TEXT = "Hello 你好, 世界! 龘靐齉 🙂 the end. 北京是中国的首都。"


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["Hello world, the end.", "你好世界。", "北京是中国的首都。"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _stream(detok: IncrementalDetokenizer, ids: list[int], step: int) -> list[str]:
    chunks = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    return chunks + [detok.flush()]


def test_the_fixture_really_splits_characters_across_tokens(tokenizer):
    ids = tokenizer.encode("龘")
    assert len(ids) == 3 and all("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_chunks_never_contain_replacement_char_and_concatenate_to_decode(tokenizer, step):
    ids = tokenizer.encode(TEXT)
    chunks = _stream(IncrementalDetokenizer(tokenizer), ids, step)
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == tokenizer.decode(ids) == TEXT


def test_prompt_context_does_not_leak_into_the_output(tokenizer):
    prompt = tokenizer.encode("Question: 龘?")
    ids = tokenizer.encode(" Answer: 靐齉 🙂")
    chunks = _stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt), ids, 1)
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == " Answer: 靐齉 🙂"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hello") + [eos] + tokenizer.encode(" 世界")
    skipped = _stream(IncrementalDetokenizer(tokenizer), ids, 1)
    kept = _stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), ids, 1)
    assert "".join(skipped) == "Hello 世界"
    assert "".join(kept) == "Hello<|endoftext|> 世界"


def test_flush_releases_an_invalid_trailing_sequence(tokenizer):
    first_byte_of_a_cjk_char = tokenizer.encode("龘")[0]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(tokenizer.encode("ok ")) == "ok "
    assert detok.add([first_byte_of_a_cjk_char]) == ""  # held back: maybe the next token completes it
    assert detok.flush() == "\ufffd"  # the bytes are invalid after all


def _feed_all(stop: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    matcher, out = StopStringMatcher(stop), []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit is not None:
            return out, hit
    return out + [matcher.flush()], None


def test_stop_string_split_across_chunks_is_held_back_then_cut():
    out, hit = _feed_all(["STOP"], ["Hello S", "T", "O", "P and more"])
    assert hit == "STOP"
    assert "".join(out) == "Hello "
    assert out == ["Hello ", "", "", ""]  # "S", "ST", "STO" were never shown


def test_earliest_stop_string_wins_and_is_excluded():
    out, hit = _feed_all(["world", "lo w"], ["Hello world"])
    assert (hit, "".join(out)) == ("lo w", "Hel")


def test_false_alarm_prefix_is_released():
    out, hit = _feed_all(["STOP"], ["a ST", "ART b"])
    assert hit is None
    assert out == ["a ", "START b", ""]


def test_held_back_text_is_flushed_at_the_end():
    out, hit = _feed_all(["</answer>"], ["42 </ans"])
    assert hit is None and out == ["42 ", "</ans"]


def test_cjk_stop_string():
    out, hit = _feed_all(["。"], ["北京是", "中国的首都", "。然后"])
    assert hit == "。" and "".join(out) == "北京是中国的首都"


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", None)
    assert matcher.flush() == ""


# -- DeltaMapper: an engine's token ids -> Deltas -------------------------------------------------


def _mapper(tokenizer, prompt="Q: ", **sampling) -> DeltaMapper:
    return DeltaMapper(tokenizer, SamplingParams(**sampling), tokenizer.encode(prompt))


def _one_step_each(mapper: DeltaMapper, ids: list[int]) -> list:
    deltas = []
    for t in ids:
        delta = mapper.feed([t])
        deltas.append(delta)
        if delta.finish_reason is not None:
            break
    return deltas


def test_stop_string_across_steps_and_split_characters(tokenizer):
    ids = tokenizer.encode(TEXT)  # "世界" is two tokens, split inside "世"; "!" is the next one
    mapper = _mapper(tokenizer, stop=["世界!"])
    deltas = _one_step_each(mapper, ids)
    assert [d.text for d in deltas] == ["Hell", "o", " ", "你好", ",", " ", "", "", ""]
    assert [d.token_ids for d in deltas] == [[t] for t in ids[:9]]
    assert [d.completion_tokens for d in deltas] == list(range(1, 10))
    assert {d.prompt_tokens for d in deltas} == {len(tokenizer.encode("Q: "))}
    assert [(d.finish_reason, d.stop_reason) for d in deltas] == [(None, None)] * 8 + [("stop", "世界!")]
    assert mapper.finished
    with pytest.raises(RuntimeError, match="already finished"):
        mapper.feed([5])


def test_utf8_split_characters_stream_whole(tokenizer):
    ids = tokenizer.encode(TEXT)
    deltas = _one_step_each(_mapper(tokenizer), ids)
    assert not any("\ufffd" in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == TEXT
    assert [d.completion_tokens for d in deltas] == list(range(1, len(ids) + 1))
    # Each byte of "龘" is a step of its own: the character comes out whole with its last byte.
    dragon = ids.index(tokenizer.encode("龘")[0])
    assert [d.text for d in deltas[dragon : dragon + 3]] == ["", "", "龘"]
    # The same ids in one step, ended by length.
    whole = _mapper(tokenizer).feed(ids, "length")
    assert (whole.text, whole.finish_reason, whole.stop_reason, whole.completion_tokens) == (
        TEXT, "length", None, len(ids),
    )


def test_held_back_text_that_is_no_stop_string_is_released(tokenizer):
    mapper = _mapper(tokenizer, stop=["world peace"])
    steps = [mapper.feed(tokenizer.encode("Hello")), mapper.feed(tokenizer.encode(" world"))]
    steps.append(mapper.feed(tokenizer.encode(" the end."), "length"))
    assert [d.text for d in steps] == ["Hello", " ", "world the end."]
    assert [(d.completion_tokens, d.finish_reason) for d in steps] == [(2, None), (3, None), (6, "length")]


def test_a_stop_token_id_ends_the_request_inside_a_step(tokenizer):
    ids = tokenizer.encode("Hello 你好, the end")
    comma = tokenizer.encode(",")[0]
    mapper = _mapper(tokenizer, stop_token_ids=[comma])
    delta = mapper.feed(ids)  # the engine did not stop on it (e.g. it ran with ignore_eos)
    assert (delta.text, delta.token_ids, delta.completion_tokens) == ("Hello 你好", ids[: ids.index(comma) + 1], 5)
    assert (delta.finish_reason, delta.stop_reason, mapper.finished) == ("stop", comma, True)


def test_stop_token_vs_eos_vs_length_finish_reasons(tokenizer):
    hello, world, eos = tokenizer.encode("Hello"), tokenizer.encode(" world")[0], tokenizer.eos_token_id

    def last(finish, matched=None, ids=hello + [world], **sampling):
        delta = _mapper(tokenizer, **sampling).feed(ids, finish, matched)
        return delta.text, delta.finish_reason, delta.stop_reason, delta.completion_tokens

    # The token the engine stopped on counts but is not text; it is the stop_reason only when requested.
    assert last("stop", eos, hello + [eos]) == ("Hello", "stop", None, 3)
    assert last("stop", world) == ("Hello", "stop", None, 3)
    assert last("stop", world, stop_token_ids=[world]) == ("Hello", "stop", world, 3)
    assert last("stop", world, hello, stop_token_ids=[world]) == ("Hello", "stop", world, 2)  # named, not sent
    # LMDeploy does not name it: the last token, unless its text holds a stop string (it stops on such tokens).
    assert last("stop") == ("Hello", "stop", None, 3)
    assert last("stop", stop=["wor"]) == ("Hello ", "stop", "wor", 3)
    # A stop string the engine matched though the text here does not show it.
    assert last("stop", "zzz", stop=["zzz"]) == ("Hello world", "stop", "zzz", 3)
    assert last("length") == ("Hello world", "length", None, 3)
    assert last("abort") == ("Hello world", "abort", None, 3)


def test_steps_that_add_nothing_give_no_delta(tokenizer):
    mapper = _mapper(tokenizer)
    assert mapper.feed([]) is None
    first = mapper.feed(tokenizer.encode("龘")[:1])  # an id, no text yet
    assert (first.text, first.completion_tokens) == ("", 1)
    end = mapper.feed([], "abort")
    assert (end.text, end.token_ids, end.finish_reason, end.completion_tokens) == ("\ufffd", [], "abort", 1)
