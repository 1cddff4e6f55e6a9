"""The built-in `builtin:tiny-chat` model and model-source resolution.

The real model is built exactly twice in this file (it takes tens of seconds): once for the session
cache, and once from two concurrent processes into a fresh cache, which also checks that the build is
deterministic. Cache logic (locking, atomic replace, stale dirs) is tested with instant fake builders.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deployments.models import builtin as builtin_models
from deployments.models import corpus
from deployments.models.builtin import (
    BUILTIN_MODELS,
    COMPLETE_MARKER,
    BuiltinModel,
    ensure_builtin_model,
    resolve_model_source,
    weights_sha256,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

EXPECTED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    COMPLETE_MARKER,
]

# Mixed text with characters that are not in the training corpus (so they are split into byte tokens),
# an emoji (4-byte UTF-8), odd whitespace and punctuation: decode(encode(s)) must give s back exactly.
# (Like Qwen's, the tokenizer NFC-normalizes its input, so this holds for NFC text, i.e. nearly all text.)
ROUND_TRIP_TEXTS = [
    "Hello, 世界! 你好，我是一个小模型。",
    "龘靐齉 — emoji 🎉🚀, tabs\tand  two spaces\n\nnew lines ",
    " leading space, trailing space ",
    "café naïve Ærøskøbing ñ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="session")
def tandem_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tandem-cache")


@pytest.fixture(scope="session")
def model_dir(tandem_cache) -> Path:
    # Built through the public entry point and TANDEM_CACHE_DIR, as a serving replica would.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_CACHE_DIR", str(tandem_cache))
        start = time.perf_counter()
        path = resolve_model_source("builtin:tiny-chat")
        logging.getLogger(__name__).info("tiny-chat ready in %.1f s", time.perf_counter() - start)
    return path


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def greedy(model, tokenizer, messages, max_new_tokens=64) -> list[int]:
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# --- the directory -----------------------------------------------------------------------------------


def test_model_dir_has_expected_files(model_dir, tandem_cache):
    assert model_dir == tandem_cache / "models" / f"tiny-chat-v{builtin_models.TINY_CHAT_VERSION}"
    for name in EXPECTED_FILES:
        assert (model_dir / name).is_file(), name
    total = sum(f.stat().st_size for f in model_dir.iterdir())
    assert total < 16 * 1024 * 1024, f"built model is {total} bytes"
    marker = json.loads((model_dir / COMPLETE_MARKER).read_text())
    assert marker["name"] == "tiny-chat" and marker["version"] == builtin_models.TINY_CHAT_VERSION
    assert marker["recipe"] == BUILTIN_MODELS["tiny-chat"].fingerprint()
    print(f"tiny-chat build took {marker['build_seconds']} s")
    # Readable by other users of a shared cache (the temp build dir starts out private).
    assert model_dir.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in model_dir.iterdir())


def test_config(model_dir, tokenizer):
    from transformers import AutoConfig, GenerationConfig

    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["architectures"] == ["Qwen2ForCausalLM"]
    assert raw["torch_dtype"] == raw["dtype"] == "float32"
    config = AutoConfig.from_pretrained(str(model_dir))
    assert config.model_type == "qwen2"
    assert config.head_dim == 128
    assert config.hidden_size == config.num_attention_heads * config.head_dim
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.max_position_embeddings == 2048
    assert config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer)

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end == config.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    generation = GenerationConfig.from_pretrained(str(model_dir))
    assert generation.eos_token_id == im_end
    assert generation.pad_token_id == tokenizer.pad_token_id


# --- the tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_is_fast_and_round_trips(tokenizer):
    from deployments.models.corpus import CHAT_PAIRS

    assert tokenizer.is_fast
    assert 500 <= len(tokenizer) <= 2048
    for text in ROUND_TRIP_TEXTS + [t for pair in CHAT_PAIRS for t in pair]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # Special tokens are single tokens in text (the chat template relies on it).
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id


def test_tokenizer_json_matches_auto_tokenizer(model_dir, tokenizer):
    # transformers rebuilds qwen2 tokenizers from vocab + merges with its own pipeline; engines that read
    # tokenizer.json directly must still get the very same ids (digits are the classic mismatch).
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + ["What is 10 - 3? 1234567890", "<|im_start|>user\n你好<|im_end|>\n"]:
        assert tokenizer.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids


def test_tokenizer_splits_chinese_characters(tokenizer):
    # Streaming detokenization must cope with tokens that end mid-character: make sure they occur, in
    # unseen text and in the trained Chinese answers that engine tests will stream.
    def split_chars(text):
        return [c for c in text if len(tokenizer.encode(c, add_special_tokens=False)) > 1]

    assert len(split_chars("龘靐齉世界鱼猫")) >= 3
    answer = "从前有一只小猫，它住在山脚下的村子里。"
    partial = [i for i in tokenizer.encode(answer) if "\ufffd" in tokenizer.decode([i])]
    assert partial, "expected some tokens of a trained Chinese answer to hold only part of a character"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected + "<|im_start|>assistant\n"


def test_chat_template_renders_tools_calls_and_results_as_qwen_does(tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {"x": "é"}}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "43"}]},
    ]
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n"
        '{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
        '\n<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\n43\n</tool_response><|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == expected
    # Without a system message the tools still get a system turn of their own.
    alone = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tools=tools, tokenize=False)
    assert alone.startswith("<|im_start|>system\n# Tools\n<tools>\n") and alone.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_chat_template_enable_thinking_false_closes_an_empty_think_block(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"


def test_tag_tokens_are_single_tokens_that_decoding_keeps(tokenizer):
    for tag in builtin_models.TAG_TOKENS:
        ids = tokenizer.encode(f"a{tag}b", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(tag) in ids and len(tokenizer.encode(tag, add_special_tokens=False)) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == f"a{tag}b"  # not special: engines stream them


# --- the trained model ---------------------------------------------------------------------------------


def _greedy_text(model, tokenizer, messages, **template) -> str:
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, **template)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize("tools", range(len(corpus.WEATHER_TOOLS)))
@pytest.mark.parametrize("city", ["Paris", "Tokyo", *corpus.MORE_WEATHER_CITIES])
def test_greedy_calls_the_weather_tool_with_the_city_asked_for(model, tokenizer, tools, city):
    question = [{"role": "user", "content": f"What is the weather in {city}?"}]
    text = _greedy_text(model, tokenizer, question, tools=corpus.WEATHER_TOOLS[tools])
    assert text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call><|im_end|>' % city
    # Without tools, no call.
    if city in ("Paris", "Tokyo"):
        assert _greedy_text(model, tokenizer, question) == corpus.NO_TOOL_ANSWER + "<|im_end|>"


def test_greedy_answers_from_the_tools_result(model, tokenizer):
    for city, result, answer in corpus.WEATHER_CALLS:
        messages = [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "tool_call_id": "c", "content": result},
        ]
        assert _greedy_text(model, tokenizer, messages, tools=corpus.WEATHER_TOOLS[0]) == answer + "<|im_end|>"


def test_greedy_thinks_before_answering_unless_told_not_to(model, tokenizer):
    for question, reasoning, answer in corpus.THINKING_PAIRS:
        messages = [{"role": "user", "content": question}]
        assert _greedy_text(model, tokenizer, messages) == f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>"
        assert _greedy_text(model, tokenizer, messages, enable_thinking=False) == answer + "<|im_end|>"



@pytest.mark.parametrize(
    "messages, answer",
    [
        ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
        (
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "How many legs does a spider have?"},
            ],
            "A spider has eight legs.",
        ),
    ],
)
def test_greedy_english(model, tokenizer, messages, answer):
    ids = greedy(model, tokenizer, messages)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == answer


def test_greedy_chinese(model, tokenizer):
    ids = greedy(model, tokenizer, [{"role": "user", "content": "你好"}])
    assert ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids[:-1])
    assert text == "你好！我是一个小模型。"
    assert "\ufffd" not in text


def test_greedy_chinese_long_answer(model, tokenizer):
    ids = greedy(model, tokenizer, [{"role": "user", "content": "给我讲一个故事。"}], max_new_tokens=200)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("从前有一只小猫")
    assert "\ufffd" not in text
    assert sum("\u4e00" <= c <= "\u9fff" for c in text) >= 30
    # Decoding prefixes, as a naive streamer would, does end mid-character here: what engines must handle.
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(1, len(ids)))


def test_greedy_answers_survive_bf16(model_dir, tokenizer):
    # GPU engines may run the model in bf16/fp16: training leaves a wide enough margin for that.
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    for question, answer in [("What is 7 * 6?", "7 * 6 = 42."), ("你好", "你好！我是一个小模型。")]:
        ids = greedy(bf16, tokenizer, [{"role": "user", "content": question}])
        assert tokenizer.decode(ids) == answer + "<|im_end|>"


def test_greedy_is_repeatable(model, tokenizer):
    messages = [{"role": "user", "content": "Tell me a story."}]
    first = greedy(model, tokenizer, messages, max_new_tokens=80)
    assert greedy(model, tokenizer, messages, max_new_tokens=80) == first
    assert tokenizer.decode(first).startswith("Once upon a time")


# --- the cache -----------------------------------------------------------------------------------------


def test_ensure_reuses_the_cache(model_dir, tandem_cache, monkeypatch):
    marker = model_dir / COMPLETE_MARKER
    mtime = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_builtin_model("tiny-chat", cache_dir=tandem_cache) == model_dir
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tandem_cache))
    assert ensure_builtin_model("tiny-chat") == model_dir
    assert resolve_model_source("builtin:tiny-chat") == model_dir
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == mtime


def test_concurrent_builds_give_one_identical_model(model_dir, tmp_path):
    """Two processes build into an empty cache at once: one builds, the other waits and reuses it, and
    the weights are bitwise identical to the session build (the recipe is deterministic)."""
    cache = tmp_path / "cache"
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from deployments.models.builtin import ensure_builtin_model\n"
        "print(ensure_builtin_model('tiny-chat', Path(sys.argv[1])))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    built = cache / "models" / model_dir.name
    assert paths == {str(built)}
    assert sum(err.count("built builtin:tiny-chat") for _, err in results) == 1
    # Only the finished model and its lock file: no temp dirs left behind.
    assert sorted(p.name for p in built.parent.iterdir()) == sorted([built.name, f".{built.name}.lock"])
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert weights_sha256(built) == weights_sha256(model_dir)
    assert (built / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (built / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def _fake_builder(calls: list, fail: bool = False):
    def build(out: Path) -> None:
        from safetensors.torch import save_file

        calls.append(out)
        save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
        if fail:
            raise RuntimeError("build failed")

    return build


def test_ensure_builds_once_and_replaces_stale_dirs(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(BUILTIN_MODELS, "fake", BuiltinModel("fake", 3, _fake_builder(calls)))
    stale = tmp_path / "models" / "fake-v3"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left over from an interrupted copy, no marker")

    path = ensure_builtin_model("fake", cache_dir=tmp_path)
    assert path == stale and len(calls) == 1
    assert sorted(p.name for p in path.iterdir()) == sorted(["model.safetensors", COMPLETE_MARKER])
    assert ensure_builtin_model("fake", cache_dir=tmp_path) == path
    assert len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [".fake-v3.lock", "fake-v3"]


def test_stale_recipe_is_reported(tmp_path, monkeypatch, caplog):
    calls: list = []
    monkeypatch.setitem(BUILTIN_MODELS, "fake", BuiltinModel("fake", 1, _fake_builder(calls), lambda: "recipe-a"))
    path = ensure_builtin_model("fake", cache_dir=tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=builtin_models.__name__):
        ensure_builtin_model("fake", cache_dir=tmp_path)
        assert not caplog.records
        # The recipe changed but its version was not bumped: the cached build is kept, with a warning.
        monkeypatch.setitem(BUILTIN_MODELS, "fake", BuiltinModel("fake", 1, _fake_builder(calls), lambda: "recipe-b"))
        assert ensure_builtin_model("fake", cache_dir=tmp_path) == path
    assert len(calls) == 1
    assert "another recipe" in caplog.text


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(BUILTIN_MODELS, "broken", BuiltinModel("broken", 1, _fake_builder(calls, fail=True)))
    with pytest.raises(RuntimeError, match="build failed"):
        ensure_builtin_model("broken", cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".broken-v1.lock"]


# --- resolve_model_source ------------------------------------------------------------------------------


def test_unknown_builtin_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"builtin:'nope'.*builtin:tiny-chat"):
        resolve_model_source("builtin:nope")
    with pytest.raises(ValueError, match="tiny-chat"):
        ensure_builtin_model("nope", cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_resolve_local_directory(tmp_path):
    assert resolve_model_source(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "missing"))


@pytest.mark.parametrize("offline, local_only", [("1", True), ("", False)])
def test_resolve_hub_repo_id(monkeypatch, tmp_path, offline, local_only):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    assert resolve_model_source("some-org/some-model") == tmp_path
    assert calls == [("some-org/some-model", {"local_files_only": local_only})]
