"""The LMDeploy engines' configuration, apart from their runtime: Tandem's `engine_args` as LMDeploy's own
`TurbomindEngineConfig` / `PytorchEngineConfig`, the config-time checks of a model (`python -m cluster check`
runs them through the registry), `engine: auto`'s TurboMind hook, and a request's `SamplingParams` as LMDeploy's
`GenerationConfig`. Nothing here needs an accelerator or a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from typing import Any, Literal

from lmdeploy.messages import GenerationConfig, PytorchEngineConfig, QuantPolicy, TurbomindEngineConfig

from deployments.engines.engine import SamplingParams, validate_sampling

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
_LMDEPLOY_ENGINES = "turbomind, lmdeploy-pytorch"
_DEFAULT_SAMPLING = SamplingParams()
# SamplingParams fields LMDeploy's GenerationConfig cannot carry with Tandem's meaning: field -> why.
_UNSUPPORTED_SAMPLING = {
    "presence_penalty": "LMDeploy's GenerationConfig has no presence penalty",
    "frequency_penalty": "LMDeploy's GenerationConfig has no frequency penalty",
    # TurboMind ignores GenerationConfig.logits_processors, the PyTorch engine's only route to a bias.
    "logit_bias": "TurboMind has no logit bias",
    "repetition_penalty": "LMDeploy drops it from greedy requests, and its PyTorch engine penalizes only the "
    "completion's tokens, not the prompt's",
}


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


def generation_config(sampling: SamplingParams, vocab_size: int | None = None) -> GenerationConfig:
    """Tandem's SamplingParams -> LMDeploy's GenerationConfig. Raises ValueError for values LMDeploy cannot take
    (stop token ids at or beyond `vocab_size` among them, when it is given) and for the knobs it cannot honour
    (`_UNSUPPORTED_SAMPLING`). min_tokens is min_new_tokens; min_p is sent for sampled requests only."""
    sp = sampling
    _validate_sampling(sp, vocab_size)
    greedy = sp.temperature == 0
    return GenerationConfig(
        max_new_tokens=sp.max_tokens,
        # LMDeploy's greedy decoding is do_sample=False, which it runs as top_k=1.
        do_sample=not greedy,
        temperature=1.0 if greedy else float(sp.temperature),
        top_k=1 if greedy else sp.top_k,  # 0 disables top-k in both LMDeploy engines, as in Tandem
        top_p=1.0 if greedy else float(sp.top_p),
        min_p=0.0 if greedy else float(sp.min_p),
        random_seed=sp.seed,
        # With ignore_eos LMDeploy drops (TurboMind) or bans (PyTorch engine) every stop id, the ones it derives
        # from stop words included; DeltaMapper then stops on the requested stop strings and ids itself.
        stop_words=None if sp.ignore_eos else list(sp.stop) or None,
        stop_token_ids=None if sp.ignore_eos else list(sp.stop_token_ids) or None,
        ignore_eos=sp.ignore_eos,
        # Both engines hold back EOS and the stop token ids until then. Under ignore_eos nothing needs holding back
        # (no stop ids, see _validate_sampling), and TurboMind would still hold EOS.
        min_new_tokens=None if sp.ignore_eos else sp.min_tokens or None,
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


def _validate_sampling(sp: SamplingParams, vocab_size: int | None) -> None:
    validate_sampling(sp, vocab_size)
    # LMDeploy's own limits.
    if sp.temperature > _MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [0, {_MAX_TEMPERATURE}] for LMDeploy engines, got {sp.temperature!r}")
    if sp.seed is not None and not 0 <= sp.seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64) for LMDeploy engines, got {sp.seed!r}")
    for name, unsupported in _UNSUPPORTED_SAMPLING.items():
        value = getattr(sp, name)
        if value != getattr(_DEFAULT_SAMPLING, name):
            raise ValueError(f"{name} is not supported by the LMDeploy engines ({_LMDEPLOY_ENGINES}): {unsupported}, got {value!r}")
    if sp.logprobs is not None:
        # Not mapped to GenerationConfig.logprobs yet.
        raise ValueError(f"logprobs are not supported by the LMDeploy engines ({_LMDEPLOY_ENGINES}) yet")
    if sp.min_tokens and sp.ignore_eos and sp.stop_token_ids:
        # With ignore_eos the adapter sends LMDeploy no stop ids (see generation_config), and the PyTorch engine
        # skips min_new_tokens altogether: nothing would hold the stop token ids back.
        raise ValueError(
            f"min_tokens with ignore_eos and stop_token_ids is not supported by the LMDeploy engines ({_LMDEPLOY_ENGINES}): "
            "LMDeploy cannot hold stop token ids back while it ignores EOS"
        )
