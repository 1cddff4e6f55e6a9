"""The LMDeploy engines behind the `Engine` seam: TurboMind (CUDA GPUs) and LMDeploy's PyTorch engine (Ascend NPUs).

Both adapters run LMDeploy's own serving stack in the replica: `lmdeploy.serve.core.AsyncEngine`, the object
that `lmdeploy.pipeline` and `lmdeploy serve api_server` build around a `TurbomindEngineConfig` /
`PytorchEngineConfig`. Per request the adapter calls `AsyncEngine.preprocess` (on prompt token ids: the replica
has already rendered any chat template, so LMDeploy's is never applied) and streams `AsyncEngine.generate`,
whose per-step `GenOut`s `DeltaMapper` turns into Tandem `Delta`s. Closing that stream early makes LMDeploy's
own `safe_run` abort the request on the engine (TurboMind's cancel, the PyTorch engine's STOP_SESSION) and hand
its request slot back.

What LMDeploy does not do the way Tandem promises, the adapter adds:

- Stop strings. LMDeploy turns `stop_words` into stop *token ids* (tokens whose text contains the word), so a
  stop string spanning tokens never stops it. The adapter passes them on (a one-token stop ends generation in
  the engine) and also cuts the streamed text at the first stop string with `StopStringMatcher`, ending the
  request there. (With ignore_eos LMDeploy would drop or ban all stop ids, so then only the adapter stops.)
- UTF-8-safe text. Deltas are detokenized with Tandem's `IncrementalDetokenizer`, so every engine streams the
  same text for the same tokens, and a stop token id can be cut out of a multi-token step.
- Scoring. TurboMind returns all-token logits (`AsyncEngine.async_get_logits`; LMDeploy refuses them when prefix
  caching is on); the PyTorch engine returns input-token log-probs (`logprob_start_len`, prefix-cache safe).

`build_engine_config`, `check_turbomind_args`, `check_pytorch_args`, `turbomind_supports`, `generation_config`
and `DeltaMapper` need no accelerator and no model: `python -m cluster check` and the tests use them on CPU.
"""

from __future__ import annotations

import abc
import asyncio
import copy
import dataclasses
import difflib
import enum
import json
import math
import os
import time
import types
import typing
from collections import deque
from typing import Any, AsyncIterator, Literal, Sequence

from lmdeploy.messages import GenerationConfig, PytorchEngineConfig, QuantPolicy, TurbomindEngineConfig
from lmdeploy.serve.core import EngineHealthMonitor, ErrorCode, RequestError

from deployments.engines.text import IncrementalDetokenizer, StopStringMatcher
from deployments.engines.engine import (
    Delta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    PromptTooLongError,
    SamplingParams,
    continuation_sequences,
    validate_sampling,
)

Backend = Literal["turbomind", "pytorch"]

_CONFIG_CLASSES: dict[str, type] = {"turbomind": TurbomindEngineConfig, "pytorch": PytorchEngineConfig}
_ENGINE_NAMES = {"turbomind": "turbomind", "pytorch": "lmdeploy-pytorch"}

# Set by the deployment, never by engine_args: field -> what to do instead.
_PLACEMENT = "Ray places the replica and hands it accelerator.count devices"
_RESERVED_FIELDS: dict[str, dict[str, str]] = {
    "turbomind": {
        "tp": "the tensor-parallel size is accelerator.count; set that instead",
        "dp": "one replica runs one engine; scale out with replicas instead",
        "devices": _PLACEMENT,
        "device_num": _PLACEMENT,
        "nnodes": "a replica runs on one node",
        "node_rank": "a replica runs on one node",
        "dist_init_addr": "a replica runs on one node",
    },
    "pytorch": {
        "tp": "the tensor-parallel size is accelerator.count; set that instead",
        "dp": "one replica runs one engine; scale out with replicas instead",
        "dp_rank": "one replica runs one engine; scale out with replicas instead",
        "device_type": "the lmdeploy-pytorch engine always runs on Ascend NPUs (device_type='ascend'); "
        "use the turbomind engine for CUDA GPUs",
    },
}

# Tandem's defaults over LMDeploy's (engine_args override them).
_DEFAULTS: dict[str, dict[str, Any]] = {
    # Tandem serves text only: never load a checkpoint's vision encoder.
    "turbomind": {"language_model_only": True},
    "pytorch": {
        "language_model_only": True,
        # The PyTorch engine's input log-probs are prefix-cache safe, so caching costs `score` nothing.
        "enable_prefix_caching": True,
        # Input-token log-probs (`score`, `prompt_logprobs`) must come back as log-softmax values.
        "logprobs_mode": "raw_logprobs",
    },
}
# TurboMind keeps LMDeploy's enable_prefix_caching=False: with it on, LMDeploy returns no all-token logits,
# which `score` / `prompt_logprobs` (SGLang `select`) need on TurboMind.

_MODEL_FORMATS = {
    "turbomind": (None, "hf", "awq", "gptq", "compressed-tensors", "fp8", "mxfp4"),
    "pytorch": (None, "fp8"),
}
_QUANT_POLICIES = {
    "turbomind": tuple(int(p) for p in QuantPolicy if p not in (QuantPolicy.FP8, QuantPolicy.FP8_E5M2)),
    "pytorch": tuple(int(p) for p in QuantPolicy),
}
_DTYPES = ("auto", "float16", "bfloat16")

_MAX_TEMPERATURE = 2.0  # GenerationConfig's range
_MAX_SEED = 2**64  # TurboMind and the PyTorch engine take unsigned 64-bit seeds
_RATE_WINDOW_S = 5.0
_LOGIT_ROWS_PER_CHUNK = 256  # bounds the float32 copy of a long sequence's logits while scoring


# -- engine_args --------------------------------------------------------------------------------


def build_engine_config(
    backend: Backend, engine_args: dict, device_count: int
) -> TurbomindEngineConfig | PytorchEngineConfig:
    """Tandem's engine_args -> LMDeploy's own engine config dataclass (no model, no accelerator needed).

    `tp` is `device_count` (accelerator.count); the PyTorch backend runs on Ascend (`device_type="ascend"`).
    Every other field of the dataclass may be set; unknown keys, wrong types and values LMDeploy's own
    `__post_init__` rejects raise ValueError naming the field.
    """
    if backend not in _CONFIG_CLASSES:
        raise ValueError(f"unknown LMDeploy backend {backend!r}; known: {sorted(_CONFIG_CLASSES)}")
    if not isinstance(engine_args, dict):
        raise ValueError(f"engine_args must be a mapping, got {type(engine_args).__name__}")
    if not isinstance(device_count, int) or isinstance(device_count, bool) or device_count < 1:
        raise ValueError(f"accelerator.count must be a positive integer, got {device_count!r}")
    cls = _CONFIG_CLASSES[backend]
    engine = _ENGINE_NAMES[backend]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    reserved = _RESERVED_FIELDS[backend]

    for key, value in engine_args.items():
        if key in reserved:
            given = f"{key}={value!r}" + (f" with accelerator.count={device_count}" if key == "tp" else "")
            raise ValueError(f"engine_args.{key} cannot be set for the {engine} engine ({given}): {reserved[key]}")
        if key not in fields:
            allowed = sorted(set(fields) - set(reserved))
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown engine_args key {key!r} for the {engine} engine ({cls.__name__}).{hint} Allowed: {allowed}"
            )
        field = fields[key]
        if not (value is None and field.default is None) and not _type_ok(value, hints[key]):
            raise ValueError(f"engine_args.{key} must be {_describe(hints[key])}, got {value!r}")

    _check_values(backend, engine_args)
    kwargs = {**_DEFAULTS[backend], **engine_args, "tp": device_count}
    if backend == "pytorch":
        kwargs["device_type"] = "ascend"
    for key, value in kwargs.items():
        annotation = hints[key]
        # YAML gives enum fields as plain values; the plain PytorchEngineConfig dataclass would keep them so.
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum) and value is not None:
            kwargs[key] = annotation(value)
    try:
        return cls(**kwargs)
    except (AssertionError, ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        errors = e.errors() if hasattr(e, "errors") else None  # pydantic: one entry per failed check
        detail = "; ".join(err["msg"] for err in errors) if errors else str(e).strip()
        raise ValueError(
            f"engine_args rejected by LMDeploy's {cls.__name__}: {detail or 'one of its value checks failed'} "
            f"(engine_args: {engine_args})"
        ) from None


def _check_values(backend: Backend, args: dict) -> None:
    """The common fields, with messages clearer than the dataclasses' bare asserts."""
    engine = _ENGINE_NAMES[backend]

    def positive_int(key: str) -> None:
        value = args.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"engine_args.{key} must be a positive integer, got {value!r}")

    for key in ("session_len", "max_batch_size", "max_prefill_token_num"):
        positive_int(key)
    if "dtype" in args and args["dtype"] not in _DTYPES:
        raise ValueError(f"engine_args.dtype must be one of {list(_DTYPES)}, got {args['dtype']!r}")
    if "quant_policy" in args and int(args["quant_policy"]) not in _QUANT_POLICIES[backend]:
        raise ValueError(
            f"engine_args.quant_policy (KV-cache quantization) must be one of {list(_QUANT_POLICIES[backend])} "
            f"for the {engine} engine (0: none, 4: int4, 8: int8), got {args['quant_policy']!r}"
        )
    if "model_format" in args and args["model_format"] not in _MODEL_FORMATS[backend]:
        raise ValueError(
            f"engine_args.model_format must be one of {list(_MODEL_FORMATS[backend])} for the {engine} engine, "
            f"got {args['model_format']!r}"
        )
    if "cache_max_entry_count" in args:
        value = args["cache_max_entry_count"]
        if backend == "pytorch" and not 0 < value < 1:
            raise ValueError(
                f"engine_args.cache_max_entry_count (fraction of free device memory for the KV cache) must be in "
                f"(0, 1) for the {engine} engine, got {value!r}"
            )
        if backend == "turbomind" and not value > 0:
            raise ValueError(
                "engine_args.cache_max_entry_count must be > 0 (a fraction of free GPU memory below 1, or a "
                f"number of KV blocks), got {value!r}"
            )
    if backend == "pytorch" and args.get("logprobs_mode", "raw_logprobs") != "raw_logprobs":
        raise ValueError(
            f"engine_args.logprobs_mode must be 'raw_logprobs' (the default) for the {engine} engine: score and "
            f"prompt_logprobs read log-softmax values from it, got {args['logprobs_mode']!r}"
        )


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether `value` fits a dataclass field annotation (plain types, unions, Literal, generics, enums)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is not None:  # list[int], dict[str, Any], Callable[...]: check the container only
        return isinstance(value, origin) if isinstance(origin, type) else True
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            annotation(value)
            return True
        except (ValueError, TypeError):
            return False
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {[m.value for m in annotation]}"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _check_tp(engine: str, device_count: int, hf_config: dict | None) -> None:
    if device_count & (device_count - 1):
        raise ValueError(
            f"accelerator.count={device_count} is not a tensor-parallel size the {engine} engine accepts: "
            "use a power of two (1, 2, 4, 8)"
        )
    if hf_config is None or device_count == 1:
        return
    text_config = _text_config(hf_config)
    heads = text_config.get("num_attention_heads")
    kv_heads = text_config.get("num_key_value_heads") or heads
    if isinstance(heads, int) and heads % device_count:
        raise ValueError(
            f"accelerator.count={device_count} does not divide the model's num_attention_heads={heads}: "
            f"the {engine} engine splits attention heads evenly across devices"
        )
    # LMDeploy repeats KV heads up to a multiple of tp, which works only when one divides the other.
    if isinstance(kv_heads, int) and kv_heads % device_count and device_count % kv_heads:
        raise ValueError(
            f"accelerator.count={device_count} and the model's num_key_value_heads={kv_heads} must divide one "
            f"another for the {engine} engine to split or replicate the KV heads"
        )


def _text_config(hf_config: dict) -> dict:
    """The language model's part of a config.json (VL checkpoints nest it)."""
    if "num_attention_heads" in hf_config:
        return hf_config
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(hf_config.get(key), dict):
            return hf_config[key]
    return hf_config


def _architecture(hf_config: dict) -> str | None:
    archs = hf_config.get("architectures") or []
    return archs[0] if archs else None


def check_turbomind_args(engine_args: dict, device_count: int = 1, hf_config: dict | None = None) -> None:
    """Config-time checks of a `turbomind` model (no GPU needed); raises ValueError."""
    build_engine_config("turbomind", engine_args, device_count)
    _check_tp("turbomind", device_count, hf_config)
    if hf_config is None:
        return
    arch = _architecture(hf_config)
    if arch is not None and not turbomind_supports(arch):
        raise ValueError(
            f"TurboMind does not support the model's architecture {arch!r}; use engine: lmdeploy-pytorch (Ascend), "
            "transformers, or engine: auto"
        )
    quant = (_text_config(hf_config).get("quantization_config") or hf_config.get("quantization_config") or {})
    method, fmt = quant.get("quant_method"), engine_args.get("model_format")
    if method and fmt not in (None, method):
        raise ValueError(
            f"engine_args.model_format={fmt!r} contradicts the checkpoint's quantization_config "
            f"(quant_method={method!r}); leave model_format unset or set it to {method!r}"
        )


def check_pytorch_args(engine_args: dict, device_count: int = 1, hf_config: dict | None = None) -> None:
    """Config-time checks of an `lmdeploy-pytorch` model (no NPU needed); raises ValueError."""
    build_engine_config("pytorch", engine_args, device_count)
    _check_tp("lmdeploy-pytorch", device_count, hf_config)


def turbomind_supports_model(hf_config: dict | None, source: str) -> bool:
    """The registry's `supports` hook for `engine: auto` on a GPU: TurboMind when LMDeploy lists the
    model's architecture. Raises ValueError when the architecture is unknown here."""
    architectures = (hf_config or {}).get("architectures") or []
    if not architectures:
        raise ValueError(
            f"'auto' on a GPU picks TurboMind or SGLang by the model's architecture, but the config.json of "
            f"{source!r} is not on this machine; set engine: turbomind or engine: sglang"
        )
    return turbomind_supports(architectures[0])


def turbomind_supports(architecture: str) -> bool:
    """Whether TurboMind runs this Hugging Face architecture (e.g. "Qwen2ForCausalLM"), from LMDeploy's own
    table. (LMDeploy also refuses smooth_quant checkpoints of these at load time.)"""
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    return architecture in SUPPORTED_ARCHS


# -- per-request sampling -----------------------------------------------------------------------


def generation_config(sampling: SamplingParams) -> GenerationConfig:
    """Tandem's SamplingParams -> LMDeploy's GenerationConfig. Raises ValueError for values LMDeploy cannot take."""
    sp = sampling
    _validate_sampling(sp)
    greedy = sp.temperature == 0
    return GenerationConfig(
        max_new_tokens=sp.max_tokens,
        # LMDeploy's greedy decoding is do_sample=False, which it runs as top_k=1.
        do_sample=not greedy,
        temperature=1.0 if greedy else float(sp.temperature),
        top_k=1 if greedy else sp.top_k,  # 0 disables top-k in both LMDeploy engines, as in Tandem
        top_p=1.0 if greedy else float(sp.top_p),
        random_seed=sp.seed,
        # With ignore_eos LMDeploy drops (TurboMind) or bans (PyTorch engine) every stop id, the ones it derives
        # from stop words included; DeltaMapper then stops on the requested stop strings and ids itself.
        stop_words=None if sp.ignore_eos else list(sp.stop) or None,
        stop_token_ids=None if sp.ignore_eos else list(sp.stop_token_ids) or None,
        ignore_eos=sp.ignore_eos,
        response_format=response_format(sp),
        skip_special_tokens=True,
        # The last output then carries the token that stopped generation: its id is the Delta's stop_reason.
        include_stop_str_in_output=True,
    )


def response_format(sampling: SamplingParams) -> dict | None:
    """A request's regex / JSON-schema constraint in LMDeploy's `response_format` shape (None: unconstrained)."""
    if sampling.regex is not None:
        return {"type": "regex_schema", "regex_schema": sampling.regex}
    if sampling.json_schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "tandem", "schema": json.loads(sampling.json_schema)}}
    return None


def _validate_sampling(sp: SamplingParams) -> None:
    validate_sampling(sp)
    # LMDeploy's own limits.
    if sp.temperature > _MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [0, {_MAX_TEMPERATURE}] for LMDeploy engines, got {sp.temperature!r}")
    if sp.seed is not None and not 0 <= sp.seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64) for LMDeploy engines, got {sp.seed!r}")


# -- LMDeploy outputs -> Deltas -----------------------------------------------------------------


class DeltaMapper:
    """Maps one request's LMDeploy outputs, in order, to Tandem Deltas.

    Takes what `AsyncEngine.generate` yields (`GenOut`) or the pipeline's `Response`: `token_ids` (the step's new
    ids), `input_token_len`, `generate_token_len` (running) and `finish_reason`. The request must have been sent
    with `generation_config(sampling)`, whose `include_stop_str_in_output` makes the last output of a stopped
    request carry the stop token. Text comes from Tandem's detokenizer, cut at the first stop string.

    Calling the mapper returns the Delta for an output, or None when the output adds nothing. Once a Delta
    has a finish_reason the request is over (a stop string or stop token id found here ends it before LMDeploy
    does: the caller then closes LMDeploy's stream, which aborts the request).
    """

    def __init__(self, tokenizer, sampling: SamplingParams, prompt_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._stop_strings = list(sampling.stop)
        self._stop_ids = set(sampling.stop_token_ids)
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
        self._stopper = StopStringMatcher(self._stop_strings)
        self.finished = False

    def __call__(self, output) -> Delta | None:
        if self.finished:
            raise RuntimeError("the request already finished")
        ids = list(output.token_ids or [])
        prompt_tokens, completion_tokens = output.input_token_len, output.generate_token_len
        finish = output.finish_reason
        if finish == "error":
            detail = getattr(output, "error_message", None) or "no detail"
            raise EngineError(f"LMDeploy failed the request: {detail}")

        if finish is None:
            # With ignore_eos the stop ids are not sent to LMDeploy (see generation_config): stop here instead.
            cut = next((i for i, t in enumerate(ids) if t in self._stop_ids), None)
            if cut is not None:
                completion_tokens -= len(ids) - cut - 1
                ids = ids[: cut + 1]
                return self._finish(ids[:-1], ids, prompt_tokens, completion_tokens, "stop", ids[-1])
            text, stop_string = self._stopper.feed(self._detokenizer.add(ids))
            if stop_string is not None:
                self.finished = True
                return Delta(text, ids, prompt_tokens, completion_tokens, "stop", stop_string)
            if not ids and not text:
                return None
            return Delta(text, ids, prompt_tokens, completion_tokens)

        text_ids, stop_reason = ids, None
        if finish == "stop" and ids:
            stop_token = ids[-1]
            text_ids = ids[:-1]
            if stop_token in self._stop_ids:
                stop_reason = stop_token
            elif self._holds_stop_string(stop_token):
                # A token LMDeploy stopped on because it contains a stop string: its text up to the string stays.
                text_ids = ids
        return self._finish(text_ids, ids, prompt_tokens, completion_tokens, finish, stop_reason)

    def _finish(self, text_ids, ids, prompt_tokens, completion_tokens, finish, stop_reason) -> Delta:
        """The last Delta: the remaining text, cut at a stop string if one completes in it."""
        self.finished = True
        text, stop_string = self._stopper.feed(self._detokenizer.add(text_ids) + self._detokenizer.flush())
        if stop_string is not None:
            return Delta(text, ids, prompt_tokens, completion_tokens, "stop", stop_string)
        return Delta(text + self._stopper.flush(), ids, prompt_tokens, completion_tokens, finish, stop_reason)

    def _holds_stop_string(self, token_id: int) -> bool:
        if not self._stop_strings:
            return False
        text = self._tokenizer.decode([token_id], skip_special_tokens=True)
        return any(s in text for s in self._stop_strings)


# -- the engines --------------------------------------------------------------------------------


class _RateMeter:
    """Events per second over the last `window_s` seconds."""

    def __init__(self, window_s: float):
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, count: int) -> None:
        if count > 0:
            self._events.append((time.monotonic(), count))

    def rate(self) -> float:
        horizon = time.monotonic() - self._window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
        return sum(count for _, count in self._events) / self._window_s


class _LMDeployEngine(Engine):
    """One LMDeploy `AsyncEngine` per replica, driven from the replica's event loop."""

    backend: Backend

    def __init__(self, model_path: str, engine_args: dict, *, tokenizer, device_count: int = 1):
        self._model_path = str(model_path)
        self._config = build_engine_config(self.backend, dict(engine_args or {}), device_count)
        self._tokenizer = tokenizer
        self._engine = None  # lmdeploy.serve.core.AsyncEngine, once started
        self._health = None  # lmdeploy.serve.core.EngineHealthMonitor
        self._in_flight = 0
        self._rate = _RateMeter(_RATE_WINDOW_S)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is not None:
            return
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._model_path)
        try:
            # Loading weights takes long and LMDeploy builds its engines outside any event loop (as
            # `lmdeploy serve` does), so build in a worker thread, then bind the engine to this loop.
            engine = await asyncio.to_thread(self._build)
        except Exception as e:  # noqa: BLE001 - reported with LMDeploy's cause, which names the missing piece
            cause = f" ({e.__cause__!r})" if e.__cause__ is not None else ""
            raise EngineError(f"could not start the {self.name} engine on {self._model_path}: {e!r}{cause}") from e
        engine.start_loop(asyncio.get_running_loop(), use_async_api=True)
        self._health = EngineHealthMonitor(engine)
        self._health.start()
        self._engine = engine

    def _build(self):
        from lmdeploy.archs import get_task
        from lmdeploy.utils import get_logger

        # As `lmdeploy.pipeline` does: LMDeploy logs every request at INFO.
        os.environ.setdefault("TM_LOG_LEVEL", "WARNING")
        get_logger("lmdeploy").setLevel("WARNING")
        config = copy.deepcopy(self._config)  # AsyncEngine fills in session_len and friends
        _, engine_class = get_task(self.backend, self._model_path, backend_config=config)
        return engine_class(self._model_path, backend=self.backend, backend_config=config)

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        await self._health.stop()
        # In-flight streams end with finish_reason "abort".
        await engine.stop_all_session()
        engine.close()

    @property
    def max_model_len(self) -> int:
        if self._engine is not None:
            return self._engine.session_len
        if self._config.session_len is not None:
            return self._config.session_len
        raise EngineError(f"the {self.name} engine is not started (its session_len comes from the model)")

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        engine = self._require_started()
        sp = request.sampling
        gen_config = generation_config(sp)
        prompt_ids = self._prompt_token_ids(request)
        vocab = len(self._tokenizer)
        if not all(t < vocab for t in sp.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {sp.stop_token_ids!r}")
        if len(prompt_ids) + sp.max_tokens > self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), self.max_model_len, sp.max_tokens)

        session = _new_session(engine)
        prepared = await self._preprocess(engine, session, prompt_ids, gen_config, sp.max_tokens)
        outputs = engine.generate(prepared, stream_response=True)
        mapper = DeltaMapper(self._tokenizer, sp, prompt_ids)
        self._in_flight += 1
        completion_tokens = 0
        try:
            async for output in outputs:
                delta = mapper(output)
                if delta is None:
                    continue
                self._rate.add(delta.completion_tokens - completion_tokens)
                completion_tokens = delta.completion_tokens
                if delta.finish_reason is not None and output.finish_reason is not None:
                    # LMDeploy's request is over: let its stream end (release the handle) rather than close it,
                    # which would send an abort for a finished request.
                    async for _ in outputs:
                        pass
                yield delta
                if delta.finish_reason is not None:
                    return
            # LMDeploy's stream absorbs a cancellation of this task once it has aborted the request: pass it on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            raise EngineError(f"LMDeploy ended request {request.request_id} without a finish reason")
        except RequestError as e:
            raise EngineError(f"request {request.request_id} failed in LMDeploy: {e.message}") from e
        finally:
            self._in_flight -= 1
            # Consumer gone (aclose, cancellation), a stop string, or an error: closing LMDeploy's stream while the
            # request runs makes its safe_run abort it on the engine (the instance's async_cancel) and free the slot.
            await outputs.aclose()
            engine.session_mgr.remove(session)

    async def _preprocess(self, engine, session, input_ids: list[int], gen_config: GenerationConfig, max_tokens=None):
        """LMDeploy's request validation (context length, response_format compiles, ...) -> its prepared request."""
        try:
            return await engine.preprocess(None, session, gen_config=gen_config, input_ids=input_ids)
        except BaseException as e:
            # LMDeploy forgets the session on most failures, not all (e.g. a response_format that fails to compile).
            engine.session_mgr.remove(session)
            if not isinstance(e, RequestError):
                raise
            if e.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED:
                raise PromptTooLongError(len(input_ids), engine.session_len, max_tokens) from e
            if e.code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNSUPPORTED_FEATURE, ErrorCode.PREPROCESS_FAILED):
                raise ValueError(e.message) from e
            raise EngineError(f"LMDeploy refused the request: {e.message}") from e

    def _prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if request.prompt is not None:
            # The replica has already applied any chat template; add only the tokenizer's default specials.
            ids = list(self._tokenizer(request.prompt)["input_ids"])
        else:
            ids = list(request.prompt_token_ids)
            self._check_token_ids(ids, "prompt_token_ids")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _check_token_ids(self, ids: Sequence[int], what: str) -> None:
        vocab = len(self._tokenizer)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ValueError(f"{what} must be token ids in [0, {vocab})")

    # -- scoring and prompt log-probs ------------------------------------------------------------

    async def score(self, prompt: str, continuations: list[str]) -> list[float]:
        self.check_health()
        if not isinstance(prompt, str) or not all(isinstance(c, str) for c in continuations):
            raise ValueError("prompt and continuations must be strings")
        if not continuations:
            return []
        sequences = continuation_sequences(self._tokenizer, prompt, continuations)
        for full_ids, _ in sequences:
            self._check_scoring_length(full_ids)
        token_logprobs = await self._token_logprobs([ids for ids, _ in sequences])
        # token_logprobs[row][i] is the log-prob of token i + 1.
        return [math.fsum(lps[start - 1 :]) for lps, (_, start) in zip(token_logprobs, sequences)]

    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        self.check_health()
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(ids, (list, tuple)) for ids in token_ids):
            raise ValueError("token_ids must be a list of token-id lists")
        sequences = [list(ids) for ids in token_ids]
        for ids in sequences:
            self._check_token_ids(ids, "token_ids")
            self._check_scoring_length(ids)
        token_logprobs = await self._token_logprobs(sequences)
        return [[None, *lps] if ids else [] for ids, lps in zip(sequences, token_logprobs)]

    def _check_scoring_length(self, ids: Sequence[int]) -> None:
        # Both engines take the sequence as a prompt of at least one more step (LMDeploy: input < session_len).
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)

    async def _token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(ids[i] | ids[:i]) for i = 1 .. len - 1 (empty for 0 or 1 tokens)."""
        results: list[list[float]] = [[] for _ in sequences]
        rows = [i for i, ids in enumerate(sequences) if len(ids) > 1]
        if rows:
            try:
                scored = await self._sequence_logprobs([sequences[i] for i in rows])
            except RequestError as e:
                raise EngineError(f"LMDeploy failed to score: {e.message}") from e
            for i, lps in zip(rows, scored):
                results[i] = lps
        return results

    @abc.abstractmethod
    async def _sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The backend's way to `_token_logprobs` for sequences of at least two tokens."""

    # -- health and load -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        engine = self._engine
        if engine is None:
            return EngineStats(healthy=False)
        pool = engine.session_mgr.request_handle_pool
        dispatched = pool.num_dispatched if pool is not None else 0
        # Requests beyond max_batch_size wait in LMDeploy's handle pool before the engine sees them.
        waiting_for_slot = max(0, self._in_flight - dispatched)
        metrics = self._schedule_metrics(engine)
        healthy = self._health_error() is None
        if metrics is None:
            return EngineStats(
                running=dispatched, waiting=waiting_for_slot, tokens_per_s=self._rate.rate(), healthy=healthy
            )
        return EngineStats(
            running=metrics.active_seqs,
            waiting=metrics.waiting_seqs + waiting_for_slot,
            kv_cache_usage=min(1.0, max(0.0, float(metrics.cache_usage))),
            tokens_per_s=self._rate.rate(),
            healthy=healthy,
        )

    @staticmethod
    def _schedule_metrics(engine):
        """The scheduler's own counters (`ScheduleMetrics`), or None where they need an await (multi-process
        PyTorch engine) or fail."""
        try:
            metrics = engine.engine.get_schedule_metrics()
        except Exception:  # noqa: BLE001 - stats must never fail the caller
            return None
        if asyncio.iscoroutine(metrics):
            metrics.close()
            return None
        return metrics

    def check_health(self) -> None:
        error = self._health_error()
        if error is not None:
            raise EngineError(error)

    def _health_error(self) -> str | None:
        if self._engine is None:
            return f"the {self.name} engine is not started"
        # LMDeploy's monitor probes the backend in the background (engine alive, scheduler progressing).
        snapshot = self._health.snapshot()
        if snapshot["status"] == "unhealthy":
            return f"the {self.name} engine is unhealthy: {snapshot['message']}"
        return None

    def _require_started(self):
        if self._engine is None:
            raise EngineError(f"the {self.name} engine is not started")
        return self._engine


def _new_session(engine):
    """A session for one request, stamped (as LMDeploy's api_server does) so that `stop_all_session` also drops
    it while it still waits for a request handle."""
    session = engine.session_mgr.get()
    session.epoch = engine.epoch
    return session


class TurbomindEngine(_LMDeployEngine):
    """LMDeploy's TurboMind engine on CUDA GPUs; engine_args are `TurbomindEngineConfig` fields."""

    name = "turbomind"
    backend = "turbomind"

    async def _sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        if self._config.enable_prefix_caching:
            raise EngineError(
                "score / prompt_logprobs need all-token logits, which TurboMind does not return with prefix "
                "caching on; set engine_args.enable_prefix_caching: false for this model"
            )
        logits = await self._require_started().async_get_logits(input_ids=sequences)
        return await asyncio.to_thread(_logprobs_from_logits, logits, sequences)


def _logprobs_from_logits(logits: list, sequences: list[list[int]]) -> list[list[float]]:
    """Row i of a sequence's logits predicts token i + 1."""
    import torch

    results = []
    for sequence_logits, ids in zip(logits, sequences):
        targets = torch.tensor(ids[1:], device=sequence_logits.device)
        values: list[float] = []
        for start in range(0, len(ids) - 1, _LOGIT_ROWS_PER_CHUNK):
            end = min(start + _LOGIT_ROWS_PER_CHUNK, len(ids) - 1)
            log_probs = torch.log_softmax(sequence_logits[start:end].float(), dim=-1)
            values += log_probs.gather(1, targets[start:end].unsqueeze(1)).squeeze(1).tolist()
        results.append(values)
    return results


class LMDeployPytorchEngine(_LMDeployEngine):
    """LMDeploy's PyTorch engine on Ascend NPUs; engine_args are `PytorchEngineConfig` fields."""

    name = "lmdeploy-pytorch"
    backend = "pytorch"

    async def _sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return list(await asyncio.gather(*(self._input_logprobs(ids) for ids in sequences)))

    async def _input_logprobs(self, ids: list[int]) -> list[float]:
        """A scoring-only request: no new tokens, log-probs of the input's own tokens from position 1 on."""
        engine = self._require_started()
        session = _new_session(engine)
        gen_config = GenerationConfig(max_new_tokens=0, logprobs=0, logprob_start_len=0)
        prepared = await self._preprocess(engine, session, ids, gen_config)
        outputs = engine.generate(prepared, stream_response=False)
        rows, targets = None, None
        try:
            async for output in outputs:
                if output.logprobs:
                    rows, targets = output.logprobs, output.logprob_token_ids
        finally:
            await outputs.aclose()
            engine.session_mgr.remove(session)
        if rows is None or targets is None or len(rows) != len(ids) - 1:
            raise EngineError(f"LMDeploy returned no input log-probs for a {len(ids)}-token sequence")
        # Each row maps token id -> log-prob; logprobs=0 asks for the target token's alone.
        return [row[token] for row, token in zip(rows, targets)]
