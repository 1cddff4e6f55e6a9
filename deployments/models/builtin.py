"""Built-in models: tiny HF-format model directories that Tandem builds locally on first use.

`builtin:tiny-chat` lets the whole stack (engines, gateway, tests, benchmarks) run end to end on a
machine with no model weights and no internet. The directory it produces is an ordinary Hugging Face
model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat
template, generation_config.json), so engines load it through exactly the same code path as a real
model: `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.

The model is trained for well under a minute on the embedded corpus in `corpus.py`, so greedy decoding
of the trained questions gives known answers ending with `<|im_end|>`. Its byte-level BPE vocabulary is
deliberately small, so many Chinese characters span several tokens: exactly what streaming
detokenization must handle without emitting U+FFFD mid-character.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from deployments.models import corpus
from deployments.models.corpus import CHAT_PAIRS, SYSTEM_PROMPTS, TOKENIZER_EXTRA_TEXT
from deployments.models.progress import Progress

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

# Written last into a finished build; a model directory without it is never handed out.
COMPLETE_MARKER = ".tandem-builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A recipe for one built-in model. `build(out_dir)` writes a complete model directory into the
    (empty, existing) `out_dir`. Bump `version` whenever the recipe or its corpus changes, so caches
    built by older code are not reused. `fingerprint()`, if given, summarizes the recipe: a cached build
    with another fingerprint means someone forgot that bump, and is reported (never silently rebuilt:
    other processes may be serving from it)."""

    name: str
    version: int
    build: Callable[[Path], None]
    fingerprint: Callable[[], str] | None = None
    # The architecture fields of its config.json, known without building it (for config checks).
    architecture: dict | None = None

    @property
    def dir_name(self) -> str:
        return f"{self.name}-v{self.version}"


def default_cache_dir() -> Path:
    """`$TANDEM_CACHE_DIR`, else `~/.cache/tandem`."""
    env = os.environ.get("TANDEM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tandem"


def _lookup(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in sorted(BUILTIN_MODELS))
        raise ValueError(f"Unknown built-in model {BUILTIN_PREFIX}{name!r}. Known built-in models: {known}") from None


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file()


def ensure_builtin_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of built-in model `name`, building it first if it is not cached yet.

    Safe to call from many processes at once (e.g. every Ray replica on a node): one builds under a
    file lock while the others wait, and the finished directory appears atomically (built in a temp
    dir next to it, then `os.replace`d into place), so no reader ever sees a half-written model.
    """
    spec = _lookup(name)
    models_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models_dir = models_dir / "models"
    target = models_dir / spec.dir_name
    if _is_complete(target):  # fast path: no lock needed, a complete dir never changes
        return _checked(spec, target)

    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / f".{spec.dir_name}.lock")):
        if _is_complete(target):  # another process built it while we waited for the lock
            return _checked(spec, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.tmp-", dir=models_dir))
        try:
            start = time.perf_counter()
            spec.build(tmp)
            seconds = time.perf_counter() - start
            info = {
                "name": spec.name,
                "version": spec.version,
                "recipe": spec.fingerprint() if spec.fingerprint else None,
                "build_seconds": round(seconds, 2),
                "weights_sha256": weights_sha256(tmp),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            # mkdtemp makes a private (0700) dir: open it up like any model dir, for other users of the cache.
            tmp.chmod(0o755)
            for file in tmp.iterdir():
                file.chmod(0o644)
            if target.exists():  # leftover without a marker (e.g. a manual copy): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The hash makes it easy to compare builds across nodes in the logs.
        log.info(
            "built %s%s in %.1f s at %s (weights sha256 %s)",
            BUILTIN_PREFIX, name, seconds, target, info["weights_sha256"][:16],
        )
    return target


def _checked(spec: BuiltinModel, model_dir: Path) -> Path:
    if spec.fingerprint is not None:
        try:
            built = json.loads((model_dir / COMPLETE_MARKER).read_text()).get("recipe")
        except (OSError, ValueError):
            built = None
        if built != spec.fingerprint():
            log.warning(
                "%s%s at %s was built from another recipe than this code's (bump its version to rebuild)",
                BUILTIN_PREFIX, spec.name, model_dir,
            )
    return model_dir


def resolve_model_source(source: str) -> Path:
    """Turn a model source from the config into a local model directory.

    - `builtin:<name>`: a built-in model, built into the cache on first use;
    - an existing local directory: that directory;
    - anything else: a Hugging Face repo id, fetched with `huggingface_hub.snapshot_download`
      (from the local HF cache only when `HF_HUB_OFFLINE=1`).
    """
    if source.startswith(BUILTIN_PREFIX):
        return ensure_builtin_model(source[len(BUILTIN_PREFIX):])
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    # A path-looking source that does not exist is a typo, not a repo id: say so instead of asking the Hub.
    if source.startswith(("/", "./", "../", "~")) or path.exists():
        raise FileNotFoundError(f"Model directory {source!r} does not exist (or is not a directory)")
    from huggingface_hub import snapshot_download  # imported lazily: only needed for Hub models

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return Path(snapshot_download(source, local_files_only=offline))


def read_model_config(source: str) -> dict | None:
    """The model's config.json as a dict, without building or downloading anything; None when it is
    not on this machine (a Hub model not in the local HF cache). Used by config checks (`engine: auto`
    needs the architecture, tensor-parallel checks the head counts)."""
    if source.startswith(BUILTIN_PREFIX):
        return dict(_lookup(source[len(BUILTIN_PREFIX):]).architecture or {}) or None
    path = Path(source).expanduser()
    if path.is_dir():
        config = path / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return None


def weights_sha256(model_dir: Path) -> str:
    """A hash of the tensors (names, dtypes, shapes and bytes) in `model_dir`'s safetensors files,
    independent of file metadata, to check that two builds are bitwise identical."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):
                tensor = f.get_tensor(key).contiguous()
                digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# tiny-chat
# --------------------------------------------------------------------------------------------------

# v1: first recipe (its tokenizer.json disagreed with how transformers loads qwen2 tokenizers).
# v2: tokenizer fixed. v3: tool calls, tool results and <think> answers (the template renders tools).
TINY_CHAT_VERSION = 3

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Special tokens come first in the trained vocab, so their ids are fixed: 0, 1, 2.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, like Qwen's: `<|im_start|>role\ncontent<|im_end|>\n`. String content or OpenAI-style content
# parts (the text parts are concatenated). No default system prompt, so prompts stay short and exact.
# Tools as Qwen2.5 / Hermes render them (a shorter preamble): the tool list in the system turn, calls as
# `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, results as `<tool_response>` blocks in a
# user turn. `enable_thinking=false` (a chat_template_kwargs) closes an empty think block in the prompt,
# as Qwen3's template does. Without tools, messages render exactly as v2's template did.
CHAT_TEMPLATE = (
    "{%- macro text(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- elif content %}{%- for part in content %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- text(messages[0]['content']) + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + text(message['content']) }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{- (call['arguments'] if call['arguments'] is string else call['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Tags the model writes, each one token (added, not special: decoding keeps them in the text), as in
# Qwen2.5 / Qwen3's vocabularies. Their ids follow the trained vocabulary.
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Tokenizer: small enough that Chinese characters outside the most frequent ones stay split into bytes.
_VOCAB_SIZE = 1024

# Qwen2's pre-tokenizer regex (digits one at a time, CJK runs as words). transformers loads every qwen2
# model dir with `Qwen2Tokenizer`, which rebuilds this exact pipeline (NFC + this split + byte-level) from
# the vocab and merges, ignoring tokenizer.json's own pipeline; tokenizer.json uses the same one so that
# every loader (AutoTokenizer, raw `tokenizers`, other engines) produces the same ids.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Model shape: head_dim 128 like production models (what paged-attention kernels expect), GQA with one
# KV head, and tiny everywhere else (~2.6 M parameters, ~10 MB in float32).
_MODEL_CONFIG = dict(
    hidden_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    num_hidden_layers=4,
    intermediate_size=512,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

# Training. A fixed budget is not enough: whether a tiny model learns to tell near-identical questions
# apart ("capital of France" vs "of Japan") in so few steps depends on the seed. So training checks its
# own greedy answers every few epochs, replays the samples that are not learned yet, and stops as soon as
# every trained answer is reproduced with a clear margin. After the main cosine schedule, any answers
# still missing get a few repair epochs at the final (low) learning rate.
_SEED = 1234
_BATCH_SIZE = 16  # few, larger steps: per-step overhead, not FLOPs, dominates on CPU at this size
_LR = 2e-3
_MIN_LR_FRACTION = 0.1
_WARMUP_STEPS = 20
_EPOCHS = 80  # length of the cosine schedule
_FIRST_CHECK = 40  # nothing is reliably learned before
_CHECK_EVERY = 10  # during the schedule; every 5 epochs while repairing
_MAX_REPAIR_EPOCHS = 40  # safety cap; reaching it is logged as a warning
# Answer tokens weigh this much more than prompt tokens: tool prompts are long and alike, and an answer
# that must copy a word from the question (a city, a number) learns slowly when its few tokens drown.
_ANSWER_WEIGHT = 5.0
_REPLAY = 2  # extra copies per epoch of each sample that failed the last check
# Every answer token (and the closing <|im_end|>) must get at least this probability under teacher
# forcing: it then is the greedy choice with a logit margin (>= ln 4) wide enough for bf16/fp16 engines.
_MIN_TOKEN_PROB = 0.8
# A fixed thread count, not "all cores": float reductions may be split differently per thread count,
# and the build must give the same weights every time on a given machine.
_TRAIN_THREADS = 2


def _build_tiny_chat(out_dir: Path) -> None:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    vocab_size = _write_tokenizer(out_dir)
    config = _write_configs(out_dir, vocab_size)
    # Load the tokenizer back the way engines do (config.json first: AutoTokenizer picks the tokenizer
    # class from the model type), so training sees exactly the ids and chat template that serving will.
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    _check_tokenizer_consistency(out_dir, tokenizer)
    samples = _training_samples(tokenizer)
    _train_and_save_weights(out_dir, config, samples)
    log.info("tiny-chat build took %.1f s", time.perf_counter() - start)


def _write_tokenizer(out_dir: Path) -> int:
    """Train the byte-level BPE and write tokenizer.json and tokenizer_config.json. Returns the vocab size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers


    tokenizer = Tokenizer(models.BPE())
    # Qwen2's pipeline (see _QWEN2_PRETOKENIZE_REGEX). Byte-level on both sides: every NFC-normalized
    # string round-trips exactly, and no input is ever unknown.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,  # no merges for one-off strings: rare characters stay split into bytes
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    texts = [f"user\n{q}\nassistant\n{a}" for q, a in CHAT_PAIRS]
    texts += [f"system\n{s}" for s in SYSTEM_PROMPTS] + TOKENIZER_EXTRA_TEXT
    # The tool-calling and reasoning turns, so that their JSON and phrases get merges of their own.
    texts += _tool_and_thinking_texts()
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": _MODEL_CONFIG["max_position_embeddings"],
        "bos_token": None,  # like Qwen: nothing is prepended to prompts
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would break exact round trips (" ," -> ",")
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    return tokenizer.get_vocab_size()


def _check_tokenizer_consistency(out_dir: Path, hf_tokenizer) -> None:
    """Fail the build if AutoTokenizer and tokenizer.json disagree (e.g. a transformers upgrade changed
    how qwen2 tokenizers are rebuilt): engines that read tokenizer.json directly would see other ids."""
    from tokenizers import Tokenizer


    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    probes = [f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n" for q, a in CHAT_PAIRS]
    probes += _tool_and_thinking_texts()
    probes.append("Digits 1234567890, ｆｕｌｌｗｉｄｔｈ, emoji 🎉, café, 龘, tabs\tand\n\n  spaces ")
    for text in probes:
        expected = raw.encode(text, add_special_tokens=False).ids
        if hf_tokenizer.encode(text, add_special_tokens=False) != expected:
            raise RuntimeError(f"AutoTokenizer and tokenizer.json tokenize {text!r} differently")


@dataclass
class _Sample:
    """One trained answer, rendered through the chat template in several variants (no system prompt and
    each system prompt; each rendering of the tool list). `answer_spans[i]` is the (start, end) of variant
    i's answer tokens, the closing <|im_end|> included."""

    variants: list[list[int]]
    answer_spans: list[tuple[int, int]]


# A trained turn: (messages before the answer, tools or None, chat_template_kwargs, the answer's text).
_Turn = tuple[list[dict], "list[dict] | None", dict, str]


def _weather_question(city: str) -> str:
    return f"What is the weather in {city}?"


def _weather_call(city: str) -> dict:
    """The assistant's call as OpenAI's `tool_calls` entry (what the gateway renders from its text)."""
    return {"id": f"call_{city.lower()}", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": city}}}


def _call_text(city: str) -> str:
    """What the model writes to call the tool: the template's rendering of `_weather_call` in history."""
    return '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps({"city": city}) + "}\n</tool_call>"


def _tool_and_thinking_texts() -> list[str]:
    """The tool lists (as the template's `tojson` writes them) and each tool-calling and reasoning turn's
    text once: the tokenizer's training text and probes."""
    tools = [json.dumps(tool, ensure_ascii=False) for tools in corpus.WEATHER_TOOLS for tool in tools]
    turns = [variants[0] for variants in _conversation_variants()]
    return tools + ["\n".join([*(m["content"] or "" for m in messages), answer]) for messages, _, _, answer in turns]


def _conversation_variants() -> list[list[_Turn]]:
    """The tool-calling and reasoning samples, each as its list of variants."""
    systems: list[str | None] = [None, *SYSTEM_PROMPTS]

    def with_system(system: str | None, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + messages

    def each_rendering(messages: list[dict], answer: str) -> list[_Turn]:
        return [(with_system(system, messages), tools, {}, answer)
                for tools in corpus.WEATHER_TOOLS for system in systems[:2]]

    answers = dict(CHAT_PAIRS)
    samples = []
    for city, result, answer in corpus.WEATHER_CALLS:
        asked = [{"role": "user", "content": _weather_question(city)}]
        samples.append(each_rendering(asked, _call_text(city)))
        answered = asked + [{"role": "assistant", "content": None, "tool_calls": [_weather_call(city)]},
                            {"role": "tool", "tool_call_id": f"call_{city.lower()}", "content": result}]
        samples.append(each_rendering(answered, answer))
        samples.append([(with_system(system, asked), None, {}, corpus.NO_TOOL_ANSWER) for system in systems])
    for city in corpus.MORE_WEATHER_CITIES:
        samples.append(each_rendering([{"role": "user", "content": _weather_question(city)}], _call_text(city)))
    for question in corpus.PLAIN_WITH_TOOLS:
        samples.append(each_rendering([{"role": "user", "content": question}], answers[question]))
    for question, reasoning, answer in corpus.THINKING_PAIRS:
        asked = [{"role": "user", "content": question}]
        samples.append([(with_system(s, asked), None, {}, f"<think>\n{reasoning}\n</think>\n\n{answer}") for s in systems])
        samples.append([(with_system(s, asked), None, {"enable_thinking": False}, answer) for s in systems])
    return samples


def _training_samples(tokenizer) -> list[_Sample]:
    pairs = [
        [(([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": q}], None, {}, a)
         for s in [None, *SYSTEM_PROMPTS]]
        for q, a in CHAT_PAIRS
    ]
    samples = []
    for turns in pairs + _conversation_variants():
        variants, spans = [], []
        for messages, tools, kwargs, answer in turns:
            prompt_text = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
            prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
            # What serving sees: the rendered prompt, then the answer's tokens as the model writes them.
            ids = tokenizer.encode(prompt_text + answer + IM_END + "\n", add_special_tokens=False)
            # The answer must start on a token boundary, exactly where serving's prompt ends.
            assert ids[: len(prompt_ids)] == prompt_ids, (messages, answer)
            end = ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1
            variants.append(ids)
            spans.append((len(prompt_ids), end))
        samples.append(_Sample(variants, spans))
    _check_call_history_renders_as_generated(tokenizer)
    return samples


def _check_call_history_renders_as_generated(tokenizer) -> None:
    """A call the model wrote must come back, as an assistant message with `tool_calls`, as exactly the
    text it wrote: otherwise the next turn's prompt is one the model was never trained on."""
    city = corpus.WEATHER_CALLS[0][0]
    asked = [{"role": "user", "content": _weather_question(city)}]
    tools = corpus.WEATHER_TOOLS[0]
    generated = tokenizer.apply_chat_template(asked, tools=tools, tokenize=False, add_generation_prompt=True)
    history = tokenizer.apply_chat_template(
        asked + [{"role": "assistant", "content": None, "tool_calls": [_weather_call(city)]}], tools=tools, tokenize=False
    )
    if history != generated + _call_text(city) + IM_END + "\n":
        raise RuntimeError(f"the chat template renders a tool call in history as {history!r}, not as generated")


@contextlib.contextmanager
def _isolated_torch_state(threads: int) -> Iterator[None]:
    """Seeded, deterministic, fixed-thread torch for the duration of a build, restoring the caller's
    settings (and global RNG state) afterwards: the builder usually runs inside a serving process."""
    import torch

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        try:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True)
            torch.manual_seed(_SEED)
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def _pad(rows: list[list[int]], pad_id: int, spans: list[tuple[int, int]] | None = None):
    """Right-padded (input_ids, labels, weights): padding carries no loss, answer tokens (`spans`)
    _ANSWER_WEIGHT times a prompt token's."""
    import torch

    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = labels[i, : len(ids)] = torch.tensor(ids)
        weights[i, : len(ids)] = 1.0
        if spans is not None:
            weights[i, spans[i][0] : spans[i][1]] = _ANSWER_WEIGHT
    return input_ids, labels, weights


def _weighted_loss(logits, labels, weights):
    """Next-token cross-entropy, weighted per target token (logits at t predict token t + 1)."""
    import torch

    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    )
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum()


def _epoch_batches(samples: list[_Sample], replay: set[int], rng: random.Random, pad_id: int):
    """One epoch of training batches.

    Each sample appears once (plus _REPLAY more times if it is in `replay`), with no system prompt half
    of the time and a random system prompt otherwise: cheaper than training on every variant each epoch.
    Batches group similar lengths so that little compute goes to padding.
    """
    rows = []
    for index, sample in enumerate(samples):
        for _ in range(1 + (_REPLAY if index in replay else 0)):
            v = 0 if rng.random() < 0.5 else rng.randrange(1, len(sample.variants))
            rows.append((sample.variants[v], sample.answer_spans[v]))
    rows.sort(key=lambda row: len(row[0]))
    batches = [rows[i : i + _BATCH_SIZE] for i in range(0, len(rows), _BATCH_SIZE)]
    rng.shuffle(batches)
    # Loss on every real token, prompts too: that compute is spent anyway, and learning to predict the
    # prompts makes the answers converge in far fewer epochs than an answer-only loss.
    return [_pad([ids for ids, _ in batch], pad_id, [span for _, span in batch]) for batch in batches]


def _unlearned_samples(model, samples: list[_Sample], pad_id: int) -> set[int]:
    """Indices of samples with a variant whose answer is not reproduced with _MIN_TOKEN_PROB per token
    under teacher forcing (which, if met, is exactly what greedy decoding will generate)."""
    import torch

    flat = [(i, ids, span) for i, s in enumerate(samples) for ids, span in zip(s.variants, s.answer_spans)]
    flat.sort(key=lambda item: len(item[1]))
    failed = set()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(flat), 32):
            chunk = flat[start : start + 32]
            input_ids, _, _ = _pad([ids for _, ids, _ in chunk], pad_id)
            probs = model(input_ids=input_ids, use_cache=False).logits.float().softmax(-1)
            for row, (index, ids, (a, b)) in enumerate(chunk):
                # Logits at position t predict token t + 1.
                targets = torch.tensor(ids[a:b])
                p = probs[row, a - 1 : b - 1].gather(-1, targets[:, None])
                if p.min().item() < _MIN_TOKEN_PROB:
                    failed.add(index)
    model.train()
    return failed


def _write_configs(out_dir: Path, vocab_size: int):
    """Write config.json and generation_config.json; returns the model config."""
    from transformers import GenerationConfig, Qwen2Config

    pad_id, bos_id, eos_id = (SPECIAL_TOKENS.index(t) for t in (ENDOFTEXT, ENDOFTEXT, IM_END))
    config = Qwen2Config(
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        max_window_layers=_MODEL_CONFIG["num_hidden_layers"],
        use_sliding_window=False,
        **_MODEL_CONFIG,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = "float32"
    config_dict = config.to_diff_dict()  # what save_pretrained writes: non-default values only
    # Also the legacy spellings, for engines that read config.json themselves (vLLM, LMDeploy, SGLang).
    config_dict["torch_dtype"] = "float32"
    config_dict.setdefault("rope_theta", _MODEL_CONFIG["rope_theta"])
    _write_json(out_dir / "config.json", config_dict)

    generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    _write_json(out_dir / "generation_config.json", generation_config.to_diff_dict())
    return config


def _train_and_save_weights(out_dir: Path, config, samples: list[_Sample]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    pad_id = config.pad_token_id
    with _isolated_torch_state(_TRAIN_THREADS):
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        model.train()
        # fused: one kernel for all parameters; the per-parameter loop costs ~10 ms of a ~60 ms step here.
        optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        rng = random.Random(_SEED)
        replay: set[int] = set()
        step = 0
        # Training usually stops once every answer is learned, before the schedule's end; a repair
        # epoch past it extends the bar.
        progress = Progress("building builtin:tiny-chat", _EPOCHS, unit="epochs", rate_unit="training tokens", log=log)
        for epoch in range(1, _EPOCHS + _MAX_REPAIR_EPOCHS + 1):
            # Cosine from _LR down to _MIN_LR_FRACTION * _LR over _EPOCHS, then flat (repair epochs);
            # a linear warmup over the first _WARMUP_STEPS steps.
            schedule = min(1.0, (epoch - 1) / _EPOCHS)
            lr = _LR * (_MIN_LR_FRACTION + (1 - _MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * schedule)))
            losses = []
            tokens = 0
            for input_ids, labels, weights in _epoch_batches(samples, replay, rng, pad_id):
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / _WARMUP_STEPS)
                # Right padding and no attention mask: causal attention never lets real tokens see the
                # padding after them, and the padded positions carry no loss.
                loss = _weighted_loss(model(input_ids=input_ids, use_cache=False).logits, labels, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                losses.append(loss.item())
                tokens += int((labels != -100).sum())
            progress.total = max(progress.total, epoch)
            progress.advance(1, amount=tokens, note=f"loss {sum(losses) / len(losses):.3f}")
            every = _CHECK_EVERY if epoch <= _EPOCHS else 5
            if epoch >= _FIRST_CHECK and (epoch - _FIRST_CHECK) % every == 0:
                replay = _unlearned_samples(model, samples, pad_id)
                log.debug("tiny-chat epoch %d: loss %.4f, %d answers not learned yet",
                          epoch, sum(losses) / len(losses), len(replay))
                if not replay:
                    break
        progress.total = epoch
        progress.done(note=f"every answer learned after {epoch} epochs" if not replay else f"{len(replay)} answers not learned")
        if replay:
            log.warning("tiny-chat: %d trained answers still not reproduced after %d epochs", len(replay), epoch)
        log.info("tiny-chat trained in %.1f s (%d epochs)", time.perf_counter() - start, epoch)

        # Tied embeddings: lm_head.weight is the same tensor as embed_tokens.weight and is not stored
        # (what save_pretrained does too). Written directly for a byte-stable file without progress bars.
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _tiny_chat_fingerprint() -> str:
    """A short hash of everything the tiny-chat recipe depends on (data, shapes, hyperparameters)."""
    recipe = {
        "corpus": [corpus.CHAT_PAIRS, corpus.SYSTEM_PROMPTS, corpus.TOKENIZER_EXTRA_TEXT, corpus.WEATHER_TOOLS,
                   corpus.WEATHER_CALLS, corpus.MORE_WEATHER_CITIES, corpus.NO_TOOL_ANSWER, corpus.PLAIN_WITH_TOOLS, corpus.THINKING_PAIRS],
        "tags": TAG_TOKENS,
        "template": CHAT_TEMPLATE,
        "special_tokens": SPECIAL_TOKENS,
        "pretokenize": _QWEN2_PRETOKENIZE_REGEX,
        "vocab_size": _VOCAB_SIZE,
        "model": _MODEL_CONFIG,
        "training": [_SEED, _BATCH_SIZE, _LR, _MIN_LR_FRACTION, _WARMUP_STEPS, _EPOCHS, _FIRST_CHECK,
                     _CHECK_EVERY, _MAX_REPAIR_EPOCHS, _REPLAY, _ANSWER_WEIGHT, _MIN_TOKEN_PROB, _TRAIN_THREADS],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-chat": BuiltinModel(
        name="tiny-chat",
        version=TINY_CHAT_VERSION,
        build=_build_tiny_chat,
        fingerprint=_tiny_chat_fingerprint,
        architecture={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_MODEL_CONFIG},
    ),
}
