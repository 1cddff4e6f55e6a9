"""SGLang's native HTTP API (`/generate`, `/get_model_info`, `/server_info`, `/flush_cache`), as far
as SGLang's frontend `RuntimeEndpoint` uses it, so unmodified SGLang programs run against Tandem.

Like openai_protocol.py, this is wire format only: the request models. Mapping SGLang's sampling
parameters onto the base-model deployment's and rendering `meta_info` is `deployments/agents/wire.py`,
which the agents' in-cluster HandleBackend uses too, so both paths behave alike.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from cluster.openai_protocol import OpenAIError
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


# The fields and defaults are SGLang's server's (deployments/agents/wire.py, shared with the agents'
# HandleBackend); the wire module checks the values.
SGLangSamplingParams = create_model(
    "SGLangSamplingParams",
    __base__=_SamplingParamsBase,
    **{name: (Any, default) for name, default in wire.SAMPLING_DEFAULTS.items()},
)


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


# SGLang's rendering of results, shared with the agents' HandleBackend.
finish_reason = wire.finish_reason
meta_info = wire.meta_info
