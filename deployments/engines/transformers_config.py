"""The transformers engine's `engine_args`: their defaults, the checks that need no model files (run by
`python -m cluster check` through the registry), and their resolution against the model's config."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

#: engine_args of the transformers engine: name -> default (None: derived at load time, see `resolve_engine_args`)
ENGINE_ARG_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",  # one of DTYPES
    "device": "cpu",
    "max_model_len": None,  # default: config.max_position_embeddings
    "max_num_seqs": 64,  # requests decoded together in one forward pass
    "max_batch_tokens": 512,  # tokens per forward pass; longer prefills are chunked to fit
    "block_size": 128,  # tokens per KV-cache page
    "num_blocks": None,  # KV-cache pages; default: min(max_num_seqs * max_model_len, 32768) tokens' worth
    "enable_prefix_caching": True,
    # torch intra-op threads (None: leave torch's setting, which Ray derives from the replica's CPUs).
    # Small models decode faster on 1 thread, and much faster when other processes share the cores.
    "num_threads": None,
    # A request whose regex / JSON schema takes longer to compile is refused (400).
    "grammar_compile_timeout_s": 10.0,
}
DTYPES = ("float32", "bfloat16", "float16", "auto")
_POSITIVE_INT_ARGS = ("max_model_len", "max_num_seqs", "max_batch_tokens", "block_size", "num_blocks", "num_threads")
_DEFAULT_KV_CACHE_TOKENS = 32768


def check_engine_args(engine_args: dict, device_count: int = 1, hf_config: dict | None = None) -> None:
    """The checks that need no model files (also run by `python -m cluster check`)."""
    args = engine_args
    if device_count != 1:
        raise ValueError(f"the transformers engine runs on one device; accelerator.count must be 1, got {device_count}")
    unknown = sorted(set(args) - set(ENGINE_ARG_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown engine_args for the transformers engine: {unknown}; allowed: {sorted(ENGINE_ARG_DEFAULTS)}"
        )
    resolved = {**ENGINE_ARG_DEFAULTS, **args}
    for key in _POSITIVE_INT_ARGS:
        value = resolved[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"engine_args.{key} must be a positive integer, got {value!r}")
    if resolved["dtype"] not in DTYPES:
        raise ValueError(f"engine_args.dtype must be one of {sorted(DTYPES)}, got {resolved['dtype']!r}")
    timeout = resolved["grammar_compile_timeout_s"]
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"engine_args.grammar_compile_timeout_s must be a number > 0, got {timeout!r}")
    if not isinstance(resolved["enable_prefix_caching"], bool):
        raise ValueError("engine_args.enable_prefix_caching must be a boolean")


def resolve_engine_args(model_path: str, engine_args: dict, device_count: int = 1) -> dict:
    """Checked engine_args with every default filled in, the derived ones from the model's config.json."""
    check_engine_args(engine_args, device_count)
    resolved = {**ENGINE_ARG_DEFAULTS, **engine_args}
    config = AutoConfig.from_pretrained(model_path).get_text_config()
    limit = config.max_position_embeddings
    if resolved["max_model_len"] is None:
        resolved["max_model_len"] = limit
    elif resolved["max_model_len"] > limit:
        raise ValueError(f"engine_args.max_model_len={resolved['max_model_len']} exceeds the model's {limit}")
    block_size, max_len = resolved["block_size"], resolved["max_model_len"]
    if resolved["num_blocks"] is None:
        tokens = max(max_len, min(resolved["max_num_seqs"] * max_len, _DEFAULT_KV_CACHE_TOKENS))
        resolved["num_blocks"] = -(-tokens // block_size)
    elif resolved["num_blocks"] * block_size < max_len:
        # The manager's loop dies when a single request can never fit the cache.
        raise ValueError(
            f"engine_args: num_blocks * block_size = {resolved['num_blocks'] * block_size} tokens cannot hold "
            f"one max_model_len={max_len} request"
        )
    return resolved
