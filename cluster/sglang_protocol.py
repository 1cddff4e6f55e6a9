"""SGLang's native HTTP API (`/generate`, `/get_model_info`, `/server_info`, `/flush_cache`), as far
as SGLang's frontend `RuntimeEndpoint` uses it, so unmodified SGLang programs run against Tandem.

Like openai_protocol.py, this is wire format only: the request models. Mapping SGLang's sampling
parameters onto the base-model deployment's and rendering `meta_info` is `deployments/agents/wire.py`,
which the agents' in-cluster HandleBackend uses too, so both paths behave alike.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from cluster.openai_protocol import MAX_TOP_LOGPROBS, OpenAIError
from deployments.agents import wire


class _SamplingParamsBase(BaseModel):
    # SGLang's server rejects unknown sampling parameters too.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _sglang_checks(cls, data: Any) -> Any:
        # SGLang's own defaults and checks (wire.normalize); unknown names are left to extra="forbid".
        if not isinstance(data, dict):
            return data
        known = {k: v for k, v in data.items() if k in wire.SAMPLING_DEFAULTS}
        return {**data, **wire.normalize(known)}

    def to_tandem(self) -> dict[str, Any]:
        """The base model's sampling kwargs; parameters Tandem cannot honour are a 400 naming them."""
        try:
            return wire.to_tandem(self.model_dump())
        except wire.SamplingParamError as e:
            raise OpenAIError(400, str(e), param=f"sampling_params.{e.param}") from None


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_STRINGS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
_FLAG = {"type": ["boolean", "null"]}
_SERVED_AS_DEFAULT = (
    "Tandem serves the default only (another value is a 400 naming it)."
)

# What each parameter's values may be (published in the gateway's OpenAPI schema): the types and
# ranges of SGLang's `SamplingParams.verify()`, which `wire.normalize` applies. The model itself
# takes any value and leaves the checks to `wire` (one set of checks for /generate and the agents).
SAMPLING_SCHEMAS: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"type": "integer", "minimum": 0, "description": "0: prefill only (prompt logprobs)."},
    "stop": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": wire.MAX_STOP_COUNT},
        {"type": "null"},
    ]},
    "stop_token_ids": _nullable({"type": "array", "items": {"type": ["integer", "null"], "minimum": 0}}),
    "stop_regex": {**_STRINGS, "description": _SERVED_AS_DEFAULT},
    "temperature": _nullable({"type": "number", "minimum": 0}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": {"anyOf": [{"const": -1}, {"type": "integer", "minimum": 1}, {"type": "null"}], "description": "-1: off."},
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 2}),
    "min_new_tokens": _nullable({"type": "integer", "minimum": 0}),
    "n": {**_nullable({"type": "integer"}), "description": _SERVED_AS_DEFAULT},
    "beam_width": {**_nullable({"type": "integer", "minimum": 1}), "description": _SERVED_AS_DEFAULT},
    "json_schema": {"type": ["string", "null"], "description": "A JSON schema as a JSON string; at most one of json_schema and regex."},
    "regex": {"type": ["string", "null"]},
    "ebnf": {"description": _SERVED_AS_DEFAULT},
    "structural_tag": {"description": _SERVED_AS_DEFAULT},
    "ignore_eos": _FLAG,
    "skip_special_tokens": {**_FLAG, "description": _SERVED_AS_DEFAULT},
    "spaces_between_special_tokens": {**_FLAG, "description": _SERVED_AS_DEFAULT},
    "no_stop_trim": {**_FLAG, "description": _SERVED_AS_DEFAULT},
    "stream_interval": {**_nullable({"type": "integer"}), "description": _SERVED_AS_DEFAULT},
    "logit_bias": {**_nullable({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": {"type": "number"}}),
                   "description": "token id (a string) -> a number added to its logit"},
    "sampling_seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
    "custom_params": {**_nullable({"type": "object"}), "description": _SERVED_AS_DEFAULT},
    "watermark": {"description": _SERVED_AS_DEFAULT},
}
assert set(SAMPLING_SCHEMAS) == set(wire.SAMPLING_DEFAULTS)

# The fields and defaults are SGLang's server's (deployments/agents/wire.py, shared with the agents'
# HandleBackend); the wire module checks the values.
SGLangSamplingParams = create_model(
    "SGLangSamplingParams",
    __base__=_SamplingParamsBase,
    **{
        name: (Any, Field(default, json_schema_extra=SAMPLING_SCHEMAS[name]))
        for name, default in wire.SAMPLING_DEFAULTS.items()
    },
)


def _one_input_schema(schema: dict[str, Any]) -> None:
    # Exactly one of text / input_ids, given and not null (GenerateRequest._one_input).
    schema["oneOf"] = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in ("text", "input_ids")
    ]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_input_schema)

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SGLangSamplingParams = SGLangSamplingParams()
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        return self

    @model_validator(mode="after")
    def _one_rid_per_prompt(self):
        # SGLang's server: a list of rids goes with a batch, one per prompt.
        if isinstance(self.rid, list):
            if not self.is_batch:
                raise ValueError("rid must be a string (or null) for a single prompt; a list of rids is for a batch")
            if len(self.rid) != len(self.prompts()):
                raise ValueError(f"rid has {len(self.rid)} ids for {len(self.prompts())} prompts: give one per prompt")
        return self

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or (bool(self.input_ids) and isinstance(self.input_ids[0], list))

    def prompts(self) -> list[dict]:
        if self.text is not None:
            texts = self.text if isinstance(self.text, list) else [self.text]
            return [{"prompt": t} for t in texts]
        ids = self.input_ids if self.is_batch else [self.input_ids]
        return [{"prompt_token_ids": x} for x in ids]

    def check_supported(self) -> None:
        generates = bool(self.sampling_params.max_new_tokens)
        if self.top_logprobs_num and not (self.return_logprob and generates):
            raise OpenAIError(400, "top_logprobs_num is supported for generated tokens only (with return_logprob)",
                              param="top_logprobs_num")
        if not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise OpenAIError(400, f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs_num}",
                              param="top_logprobs_num")
        if self.return_logprob and generates and self.logprob_start_len != -1:
            raise OpenAIError(
                400,
                "with generation, return_logprob gives the generated tokens' log-probs only: leave logprob_start_len "
                "at -1 (prompt log-probs come from a prefill-only request, sampling_params.max_new_tokens = 0)",
                param="logprob_start_len",
            )
        if self.stream and self.is_batch:
            raise OpenAIError(400, "stream is supported for a single prompt only", param="stream")


    def logprob_meta(self, entries: list | None) -> dict:
        """The `meta_info` log-prob fields of a generation (none unless return_logprob)."""
        if not self.return_logprob:
            return {}
        return wire.output_logprobs(entries, self.top_logprobs_num, self.return_text_in_logprobs)


# SGLang's rendering of results, shared with the agents' HandleBackend.
finish_reason = wire.finish_reason
meta_info = wire.meta_info
