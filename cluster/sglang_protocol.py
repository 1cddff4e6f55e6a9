"""SGLang's native HTTP API (`/generate`, `/get_model_info`, `/server_info`, `/flush_cache`), as far
as SGLang's frontend `RuntimeEndpoint` uses it, so unmodified SGLang programs run against Tandem.

Like openai_protocol.py, this is wire format only: it maps SGLang's sampling parameters onto the
base-model deployment's and renders results as SGLang's `{"text", "meta_info"}` objects.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.openai_protocol import OpenAIError


class SGLangSamplingParams(BaseModel):
    # SGLang's server rejects unknown sampling parameters too.
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=128, ge=0)
    min_new_tokens: int = 0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1  # SGLang: -1 disables top-k
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False

    def unsupported(self) -> list[str]:
        """Parameters SGLang would honour and this engine cannot: an error, never silently ignored."""
        checks = {
            "min_new_tokens": self.min_new_tokens == 0,
            "n": self.n == 1,
            "stop_regex": not self.stop_regex,
            "min_p": self.min_p == 0,
            "frequency_penalty": self.frequency_penalty == 0,
            "presence_penalty": self.presence_penalty == 0,
            "repetition_penalty": self.repetition_penalty == 1,
            "ebnf": self.ebnf is None,
            "skip_special_tokens": self.skip_special_tokens,
            "no_stop_trim": not self.no_stop_trim,
        }
        return [name for name, ok in checks.items() if not ok]

    def to_tandem(self) -> dict[str, Any]:
        bad = self.unsupported()
        if bad:
            raise OpenAIError(400, f"sampling_params not supported by Tandem's engines: {', '.join(bad)} (use their defaults)", param="sampling_params")
        s: dict[str, Any] = {
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0),
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
        }
        if self.regex is not None:
            s["regex"] = self.regex
        if self.json_schema is not None:
            s["json_schema"] = self.json_schema
        return {k: v for k, v in s.items() if v is not None}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
        if self.top_logprobs_num:
            raise OpenAIError(400, "top_logprobs_num is not supported", param="top_logprobs_num")
        if self.return_logprob and self.sampling_params.max_new_tokens:
            raise OpenAIError(
                400,
                "return_logprob is supported for prompt tokens only (sampling_params.max_new_tokens = 0)",
                param="return_logprob",
            )
        if self.stream and self.is_batch:
            raise OpenAIError(400, "stream is supported for a single prompt only", param="stream")


def finish_reason(reason: str | None, stop_reason: Any, completion_tokens: int) -> dict | None:
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    if reason in ("stop", "abort"):
        return {"type": reason, "matched": stop_reason}
    return None


def meta_info(rid: str, prompt_tokens: int, completion_tokens: int, finish: dict | None, **extra) -> dict:
    return {
        "id": rid,
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": 0,
        **extra,
    }
