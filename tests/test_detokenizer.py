"""Incremental detokenization (UTF-8 safe) and stop-string holdback."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from deployments.engines.text import IncrementalDetokenizer, StopStringMatcher

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
