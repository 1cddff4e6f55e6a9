"""SGLang's sampling parameters and `meta_info`, as SGLang's server defines them, mapped onto Tandem's.

One module for both ways an SGLang program reaches Tandem: the gateway's native `/generate`
(`cluster/sglang_protocol.py`, used by `sgl.RuntimeEndpoint`) and the agents' `HandleBackend`
(`deployments/agents/backend.py`, in-cluster). SGLang funnels both of its own paths through one
`SglSamplingParams.to_srt_kwargs()` into its server's `SamplingParams`; here both funnel through
`to_tandem`, so a parameter means the same on either path:

- names and defaults are those of SGLang's server (`sglang/srt/sampling/sampling_params.py`), and
  `None` means the default wherever SGLang's `SamplingParams.__post_init__` says so;
- values SGLang's `verify()` rejects are rejected with its message (`SamplingParamError`);
- parameters SGLang honours and Tandem's engines cannot are an `UnsupportedSamplingError` naming
  them, never silently ignored;
- the rest becomes the base model's sampling keyword arguments (`deployments/engines/engine.py`
  `SamplingParams`: max_tokens, temperature, top_p, top_k (0 = off), seed, stop, stop_token_ids,
  ignore_eos, regex, json_schema, min_tokens (SGLang's min_new_tokens), min_p, presence_penalty,
  frequency_penalty, repetition_penalty, logit_bias (SGLang's string token ids as integers)).

Pure Python on purpose: the gateway process imports it and must stay free of SGLang and torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

# The API fields of SGLang's server-side SamplingParams, with its defaults. (SGLang's server stores
# top_k's default as TOP_K_ALL, which is what -1 becomes there: the whole vocabulary.)
SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "stop": None,
    "stop_token_ids": None,
    "stop_regex": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "n": 1,
    "beam_width": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "no_stop_trim": False,
    "stream_interval": None,
    "logit_bias": None,
    "sampling_seed": None,
    "custom_params": None,
    "watermark": None,
}

# SGLang's __post_init__ reads None as the default for these; max_new_tokens=None is not among them
# (on SGLang's server it means "as many tokens as the context allows").
_NONE_IS_DEFAULT = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "min_new_tokens", "n", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
)
_GRAMMARS = ("json_schema", "regex", "ebnf", "structural_tag")  # SGLang: at most one; "" means unset
SAMPLING_EPS = 1e-6  # SGLang: a temperature below this is greedy decoding
MAX_STOP_COUNT = 32  # SGLang's limit on stop strings

# Parameters SGLang honours and Tandem's engines cannot: name -> (the values Tandem can serve, a hint
# ({value}: the value given)).
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1, "one sample per request: send {value} requests; in an SGLang program, s.fork({value})"),
    "stop_regex": (lambda v: not v, "use stop strings"),
    "beam_width": (lambda v: v in (None, 1), ""),
    "ebnf": (lambda v: v is None, "use regex or json_schema"),
    "structural_tag": (lambda v: v is None, "use regex or json_schema"),
    "skip_special_tokens": (lambda v: v is True, ""),
    "spaces_between_special_tokens": (lambda v: v is True, ""),
    "no_stop_trim": (lambda v: v is False, ""),
    "stream_interval": (lambda v: v is None, "the deployment's stream_interval_ms applies"),
    "custom_params": (lambda v: not v, ""),
    "watermark": (lambda v: v is None, ""),
}


class SamplingParamError(ValueError):
    """A sampling parameter's value is invalid; `param` names it."""

    def __init__(self, param: str, message: str):
        self.param = param
        self.message = message
        super().__init__(message)

    def __reduce__(self):  # crosses Ray's process boundaries with its fields
        return (type(self), (self.param, self.message))


class UnsupportedSamplingError(SamplingParamError):
    """SGLang would honour these parameters and Tandem's engines cannot. `feature` lists each as
    `name=value (hint)`; `params` names them, the first one is `param`."""

    def __init__(self, unsupported: Mapping[str, Any]):
        self.unsupported = dict(unsupported)
        self.params = list(self.unsupported)
        parts = []
        for name, value in self.unsupported.items():
            hint = _unsupported_hint(name, value)
            parts.append(f"{name}={value!r}" + (f" ({hint})" if hint else ""))
        self.feature = "; ".join(parts)
        super().__init__(self.params[0], f"SGLang sampling parameters not supported by Tandem: {self.feature}")

    def __reduce__(self):
        return (type(self), (self.unsupported,))


def _unsupported_hint(name: str, value: Any) -> str:
    if name == "max_new_tokens":
        if value is None:
            return "SGLang: as many tokens as the context allows; give a number"
        return "prefill only, nothing to generate"
    return UNSUPPORTED[name][1].format(value=value)


# -- checks ------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamError(param, message)


def _strings(value: Any, param: str) -> list[str]:
    if value is None or value == () or value == []:
        return []
    items = [value] if isinstance(value, str) else value
    _check(isinstance(items, (list, tuple)) and all(isinstance(s, str) for s in items), param,
           f"{param} must be a string or a list of strings, got {value!r}")
    return list(items)


def normalize(params: Mapping[str, Any]) -> dict[str, Any]:
    """SGLang's `SamplingParams(**params)` + `verify()`: every API field, defaults filled in (None is
    the default where SGLang reads it so), values checked as SGLang checks them (plus the types Tandem
    needs). Raises SamplingParamError naming the parameter. Idempotent."""
    unknown = [k for k in params if k not in SAMPLING_DEFAULTS]
    if unknown:
        raise SamplingParamError(unknown[0], f"unknown SGLang sampling parameter(s): {', '.join(unknown)}")
    p = {**SAMPLING_DEFAULTS, **params}
    for name in _NONE_IS_DEFAULT:
        if p[name] is None:
            p[name] = SAMPLING_DEFAULTS[name]
    for name in _GRAMMARS:
        p[name] = p[name] or None

    m = p["max_new_tokens"]
    _check(m is None or _is_int(m), "max_new_tokens", f"max_new_tokens must be an integer, got {m!r}")
    _check(m is None or m >= 0, "max_new_tokens", f"max_new_tokens must be at least 0, got {m}.")
    t = p["temperature"]
    _check(_is_number(t) and math.isfinite(t) and t >= 0, "temperature",
           f"temperature must be a non-negative finite number, got {t}.")
    top_p = p["top_p"]
    _check(_is_number(top_p) and 0 < top_p <= 1, "top_p", f"top_p must be in (0, 1], got {top_p}.")
    if t >= SAMPLING_EPS:  # greedy: SGLang replaces top_k by 1 before it checks it
        k = p["top_k"]
        _check(_is_int(k) and (k == -1 or k >= 1), "top_k", f"top_k must be -1 (disable) or at least 1, got {k}.")
    min_p = p["min_p"]
    _check(_is_number(min_p) and 0 <= min_p <= 1, "min_p", f"min_p must be in [0, 1], got {min_p}.")
    for name in ("frequency_penalty", "presence_penalty"):
        v = p[name]
        _check(_is_number(v) and -2 <= v <= 2, name, f"{name} must be in [-2, 2], got {v}.")
    r = p["repetition_penalty"]
    _check(_is_number(r) and 0 < r <= 2, "repetition_penalty",
           f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {r}.")
    mn = p["min_new_tokens"]
    _check(_is_int(mn) and mn >= 0 and (m is None or mn <= m), "min_new_tokens",
           f"min_new_tokens must be in [0, max_new_tokens{'' if m is None else f'({m})'}], got {mn}.")
    _check(_is_int(p["n"]), "n", f"n must be an integer, got {p['n']!r}")
    bw = p["beam_width"]
    _check(bw is None or (_is_int(bw) and bw >= 1), "beam_width", f"beam_width must be at least 1, got {bw}.")
    seed = p["sampling_seed"]
    _check(seed is None or _is_int(seed), "sampling_seed",
           f"sampling_seed must be an integer, got {type(seed).__name__}.")
    _check(seed is None or -(2**63) <= seed <= 2**63 - 1, "sampling_seed",
           f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        _check(isinstance(p[name], bool), name, f"{name} must be a boolean, got {p[name]!r}")

    stop = _strings(p["stop"], "stop")
    _check(len(stop) <= MAX_STOP_COUNT, "stop", f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(stop)}")
    _check(all(stop), "stop", "stop strings must not be empty")
    p["stop"] = stop
    ids = [t for t in (p["stop_token_ids"] or []) if t is not None]  # SGLang drops None entries
    _check(all(_is_int(t) and t >= 0 for t in ids), "stop_token_ids",
           f"stop_token_ids must be token ids (integers >= 0), got {p['stop_token_ids']!r}")
    p["stop_token_ids"] = ids
    p["stop_regex"] = _strings(p["stop_regex"], "stop_regex")

    grammars = [name for name in _GRAMMARS if p[name] is not None]
    _check(len(grammars) <= 1, grammars[-1] if grammars else "regex",
           "Only one of json_schema, regex, ebnf, or structural_tag can be set.")
    _check(p["regex"] is None or isinstance(p["regex"], str), "regex", f"regex must be a string, got {p['regex']!r}")
    bias = p["logit_bias"]
    if bias is not None:
        _check(isinstance(bias, Mapping), "logit_bias", f"logit_bias must map token ids to numbers, got {bias!r}")
        for token, value in bias.items():
            _check(_is_int(token) or (isinstance(token, str) and token.isdigit()), "logit_bias",
                   f"logit_bias keys must be token ids, got {token!r}")
            _check(_is_number(value) and math.isfinite(value), "logit_bias",
                   f"logit_bias[{token!r}] must be a finite number, got {value!r}")
    schema = p["json_schema"]
    if schema is not None:
        _check(isinstance(schema, str), "json_schema",
               f"json_schema must be a JSON schema as a JSON string (json.dumps(schema)), got {type(schema).__name__}")
        try:
            json.loads(schema)
        except ValueError as e:
            raise SamplingParamError("json_schema", f"json_schema is not valid JSON: {e}") from None
    return p


def unsupported(params: Mapping[str, Any]) -> dict[str, Any]:
    """The normalized parameters Tandem cannot honour, with their values (empty: all can be)."""
    bad = {}
    m = params["max_new_tokens"]
    if m is None or m == 0:
        bad["max_new_tokens"] = m
    for name, (ok, _) in UNSUPPORTED.items():
        if not ok(params[name]):
            bad[name] = params[name]
    return bad


def to_tandem(params: Mapping[str, Any]) -> dict[str, Any]:
    """SGLang sampling parameters (a /generate request's, or `SglSamplingParams.to_srt_kwargs()`) ->
    the base model's sampling keyword arguments. Raises SamplingParamError / UnsupportedSamplingError."""
    p = normalize(params)
    bad = unsupported(p)
    if bad:
        raise UnsupportedSamplingError(bad)
    greedy = p["temperature"] < SAMPLING_EPS
    out: dict[str, Any] = {
        "max_tokens": p["max_new_tokens"],
        # Tandem's temperature 0 is exact greedy decoding, and its top_k 0 (not -1) is "off".
        "temperature": 0.0 if greedy else p["temperature"],
        "top_p": p["top_p"],
        "top_k": 0 if greedy or p["top_k"] == -1 else p["top_k"],
        "stop": list(dict.fromkeys(p["stop"])),
        "stop_token_ids": list(dict.fromkeys(p["stop_token_ids"])),
        "ignore_eos": p["ignore_eos"],
    }
    if p["sampling_seed"] is not None:
        out["seed"] = p["sampling_seed"]
    # Logit adjustments only when set, so a plain request stays on the engines' fast path.
    adjustments = {
        "min_tokens": (p["min_new_tokens"], 0),
        "min_p": (0.0 if greedy else p["min_p"], 0.0),  # greedy decoding keeps the top token anyway
        "presence_penalty": (p["presence_penalty"], 0.0),
        "frequency_penalty": (p["frequency_penalty"], 0.0),
        "repetition_penalty": (p["repetition_penalty"], 1.0),
    }
    out.update({name: value for name, (value, default) in adjustments.items() if value != default})
    if p["logit_bias"]:
        out["logit_bias"] = {int(token): float(value) for token, value in p["logit_bias"].items()}
    for name in ("regex", "json_schema"):
        if p[name] is not None:
            out[name] = p[name]
    return out


# -- results -----------------------------------------------------------------------------------------


def finish_reason(reason: str | None, stop_reason: Any, completion_tokens: int | None) -> dict | None:
    """A base-model finish reason as SGLang's server renders it (FINISH_MATCHED_STR/_TOKEN,
    FINISH_LENGTH, FINISH_ABORT `.to_json()`); None while unfinished."""
    if reason == "stop":
        return {"type": "stop", "matched": stop_reason}
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    if reason == "abort":
        return {"type": "abort", "message": "the base model aborted the request", "status_code": None, "err_type": None}
    return None


def output_logprobs(entries: list | None, top_logprobs_num: int, with_text: bool) -> dict:
    """A generation's log-probs as SGLang's server puts them in `meta_info` (cumulative, like its
    text), from the base model's `logprobs` entries ([token id, text, logprob, top] per token):
    `output_token_logprobs` [[logprob, id, text or None], ...] and, with `top_logprobs_num`,
    `output_top_logprobs` [[[logprob, id, text or None], ...] per token]. Tandem computes no prompt
    log-probs during a generation: `input_token_logprobs` is empty there (prefill-only requests,
    `max_new_tokens: 0`, give them)."""
    entries = entries or []
    text = (lambda t: t) if with_text else (lambda t: None)
    out = {
        "input_token_logprobs": [],
        "output_token_logprobs": [[lp, token, text(t)] for token, t, lp, _ in entries],
    }
    if top_logprobs_num:
        out["input_top_logprobs"] = []
        out["output_top_logprobs"] = [[[lp, i, text(t)] for i, t, lp in top] for _, _, _, top in entries]
    return out


def meta_info(rid: str, prompt_tokens: int | None, completion_tokens: int | None, finish: dict | None, **extra) -> dict:
    """SGLang's per-request `meta_info` (the fields its frontend reads), plus Tandem's `extra`."""
    return {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": 0,
        **extra,
    }
