"""The SGLang engine's configuration, apart from its runtime: Tandem's `engine_args` checked against SGLang's
own `ServerArgs` and built into one (`python -m cluster check` runs `check_engine_args` through the registry),
and a request's `SamplingParams` as SGLang's `sampling_params` dict. Nothing here needs a GPU or a model load.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable

from deployments.engines.engine import SamplingParams, validate_sampling

# ServerArgs values Tandem sets unless engine_args says otherwise.
TANDEM_DEFAULTS: dict[str, Any] = {
    "log_level": "warning",  # SGLang's "info" logs every batch
    # Each streamed chunk is a fresh delta (text and ids), rather than a view of lists SGLang keeps growing.
    "incremental_streaming_output": True,
}
# ServerArgs fields that come from elsewhere in Tandem's config.
_OWNED_ARGS = {
    "model_path": "the model is the model's `source`",
    "tp_size": "the tensor-parallel size is accelerator.count",
    "tokenizer_path": "SGLang must use the model's own tokenizer (the replica tokenizes with it)",
    "skip_tokenizer_init": "Tandem needs SGLang's detokenizer (streamed text, stop strings)",
    "dp_size": "a replica's accelerator.count devices are used for tensor parallelism; scale out with replicas",
    "pp_size": "a replica's accelerator.count devices are used for tensor parallelism; scale out with replicas",
    "nnodes": "a replica runs on one node",
}
# Range checks SGLang only makes when it resolves its config (which needs the GPU build): (test, allowed).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mem_fraction_static": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "context_length": (lambda v: v >= 1, "a positive number of tokens"),
    "max_running_requests": (lambda v: v >= 1, "a positive integer"),
    "max_total_tokens": (lambda v: v >= 1, "a positive number of tokens"),
}
_UNKNOWN_VOCAB = 1 << 31  # for `verify` when the vocabulary size is not known (validate_sampling then skips logit_bias' bound too)


# -- config: engine_args -> ServerArgs -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _server_args_fields() -> dict:
    import msgspec
    from sglang.srt.server_args import ServerArgs

    # ServerArgs is a msgspec Struct in 0.5.23 (earlier versions: a dataclass).
    return {f.name: f for f in msgspec.structs.fields(ServerArgs)}


def _arg_meta(annotation) -> Any:
    """The `Arg` metadata (choices, type_parser) of an `Annotated[T, Arg(...)]` field, if any."""
    from sglang.srt.arg_groups.arg_utils import Arg

    if typing.get_origin(annotation) is typing.Annotated:
        return next((m for m in typing.get_args(annotation)[1:] if isinstance(m, Arg)), None)
    return None


def _convert_arg(name: str, value: Any, annotation) -> Any:
    """`value` checked against the field's declared type (msgspec, strict: no "2" for 2) and choices."""
    import msgspec

    meta = _arg_meta(annotation)
    if isinstance(value, str) and meta is not None and meta.type_parser is not None:
        try:  # the CLI's human-readable forms, e.g. context_length: "32k"
            value = meta.type_parser(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"engine_args.{name}: {value!r} is not valid: {e}") from None
    try:
        value = msgspec.convert(value, annotation, strict=True)
    except msgspec.ValidationError as e:
        raise ValueError(f"engine_args.{name}: {e} (got {value!r})") from None
    except TypeError:
        pass  # a type msgspec cannot check (two list types in one union: lora_paths); SGLang checks at launch
    if meta is not None and meta.choices and value is not None:
        for item in value if isinstance(value, (list, tuple, set)) else [value]:
            if item not in meta.choices:
                raise ValueError(f"engine_args.{name} must be one of {list(meta.choices)}, got {item!r}")
    return value


def _validated_args(engine_args: dict, device_count: int, hf_config: dict | None) -> dict:
    if not isinstance(engine_args, dict):
        raise ValueError(f"engine_args must be a mapping, got {type(engine_args).__name__}")
    if not isinstance(device_count, int) or isinstance(device_count, bool) or device_count < 1:
        raise ValueError(f"accelerator.count must be a positive integer for the sglang engine, got {device_count!r}")
    fields = _server_args_fields()
    converted: dict[str, Any] = {}
    for name, value in engine_args.items():
        if name in _OWNED_ARGS:
            raise ValueError(f"engine_args.{name} cannot be set for the sglang engine: {_OWNED_ARGS[name]}")
        if name not in fields or name.startswith("_"):
            public = [f for f in fields if not f.startswith("_")]
            close = difflib.get_close_matches(str(name), public, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see `python -m sglang.launch_server --help`"
            raise ValueError(
                f"engine_args.{name} is not a field of SGLang's ServerArgs ({len(public)} fields); {hint}"
            )
        value = _convert_arg(name, value, fields[name].type)
        if name in _RANGES and value is not None:
            test, allowed = _RANGES[name]
            if not test(value):
                raise ValueError(f"engine_args.{name} must be {allowed}, got {value!r}")
        converted[name] = value
    if hf_config:
        _check_against_model(converted, device_count, hf_config)
    return converted


def _check_against_model(args: dict, tp: int, hf_config: dict) -> None:
    text_config = hf_config.get("text_config") or hf_config
    heads = text_config.get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        raise ValueError(
            f"accelerator.count {tp} is the tensor-parallel size and must divide the model's "
            f"num_attention_heads ({heads}); allowed: {[d for d in range(1, heads + 1) if heads % d == 0]}"
        )
    kv_heads = text_config.get("num_key_value_heads")
    if isinstance(kv_heads, int) and kv_heads % tp and tp % kv_heads:
        # SGLang splits KV heads across ranks, or replicates them when there are fewer heads than ranks.
        raise ValueError(
            f"accelerator.count {tp} (tensor-parallel size) must divide, or be a multiple of, the model's "
            f"num_key_value_heads ({kv_heads})"
        )
    context_length = args.get("context_length")
    max_positions = text_config.get("max_position_embeddings")
    if (
        context_length is not None
        and isinstance(max_positions, int)
        and not text_config.get("rope_scaling")
        and context_length > max_positions
        and os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "").lower() not in ("1", "true")
    ):
        raise ValueError(
            f"engine_args.context_length {context_length} exceeds the model's max_position_embeddings "
            f"({max_positions}); allowed: at most {max_positions}"
        )


def check_engine_args(engine_args: dict, device_count: int = 1, hf_config: dict | None = None) -> None:
    """The checks that need no GPU and no model load (run by `python -m cluster check`): every key is a
    field of SGLang's own `ServerArgs`, of its declared type and choices; fields Tandem sets itself are
    refused; the tensor-parallel size (`device_count`) fits the model's heads when `hf_config` is given.

    SGLang's own resolution of the config (`ServerArgs.resolve_once`: device, memory, model config) needs
    its GPU build (it imports torchvision and probes the device), so it runs in the replica, at launch."""
    _validated_args(engine_args, device_count, hf_config)


def _read_hf_config(model_path: str) -> dict | None:
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_server_args(model_path: str, engine_args: dict, device_count: int):
    """SGLang's `ServerArgs` for one replica: `tp_size` = `device_count`, Tandem's defaults
    (`TANDEM_DEFAULTS`), then the checked `engine_args`. Construction is cheap and CPU-only in 0.5.23
    (`__post_init__` does nothing; `Engine` resolves the record at launch)."""
    from sglang.srt.server_args import ServerArgs

    args = _validated_args(engine_args, device_count, _read_hf_config(model_path))
    return ServerArgs(model_path=str(model_path), tp_size=device_count, **{**TANDEM_DEFAULTS, **args})


# -- sampling ------------------------------------------------------------------------------------


def sampling_params(sampling: SamplingParams, *, tokenizer=None, vocab_size: int | None = None) -> dict:
    """Tandem's sampling as SGLang's `sampling_params` dict, checked by SGLang's own `SamplingParams`
    (`__post_init__`, `verify`, and `normalize` when there is a tokenizer or neither stop strings nor
    min_new_tokens: SGLang needs one to measure stop strings and to find EOS). Raises ValueError.

    top_k 0 (off) is SGLang's -1; `seed` is `sampling_seed` (which SGLang applies only with
    `enable_deterministic_inference`); min_tokens is `min_new_tokens`; logit_bias keys are strings. SGLang's
    repetition_penalty counts only the completion's tokens, so Tandem's (prompt and completion) is refused.
    Requests with stop strings get `no_stop_trim`, which only keeps SGLang's own streamed text untrimmed:
    Tandem decodes the output ids itself and cuts stop strings there."""
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

    sp = sampling
    validate_sampling(sp, vocab_size)
    if sp.logprobs is not None:
        raise ValueError("logprobs are not supported by the sglang engine yet")
    if sp.repetition_penalty != 1.0:
        raise ValueError(
            "repetition_penalty is not supported by the sglang engine: SGLang penalizes only the completion's "
            f"tokens, not the prompt's, got {sp.repetition_penalty!r}"
        )

    params: dict[str, Any] = {
        "max_new_tokens": sp.max_tokens,
        "temperature": float(sp.temperature),
        "top_p": float(sp.top_p),
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "ignore_eos": sp.ignore_eos,
        "skip_special_tokens": True,
    }
    if sp.seed is not None:
        params["sampling_seed"] = sp.seed
    if sp.stop:
        params["stop"] = list(sp.stop)
        params["no_stop_trim"] = True
    if sp.stop_token_ids:
        params["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.regex is not None:
        params["regex"] = sp.regex
    if sp.json_schema is not None:
        params["json_schema"] = sp.json_schema
    # Penalties and logit_bias apply to greedy requests too (SGLang's greedy is top_k 1 after them); min_p does not.
    if sp.presence_penalty:
        params["presence_penalty"] = float(sp.presence_penalty)
    if sp.frequency_penalty:
        params["frequency_penalty"] = float(sp.frequency_penalty)
    # SGLang holds EOS back even under ignore_eos, where it ends nothing; then only stop ids need holding back.
    if sp.min_tokens and (sp.stop_token_ids or not sp.ignore_eos):
        params["min_new_tokens"] = sp.min_tokens
    if sp.min_p and sp.temperature > 0:
        params["min_p"] = float(sp.min_p)
    if sp.logit_bias:
        params["logit_bias"] = {str(token): float(bias) for token, bias in sp.logit_bias.items()}

    try:
        check = SGLangSamplingParams(**params)
        check.verify(vocab_size or _UNKNOWN_VOCAB)
        if tokenizer is not None or not (sp.stop or "min_new_tokens" in params):
            check.normalize(tokenizer)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid sampling parameters for SGLang: {e}") from None
    return params
