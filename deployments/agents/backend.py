"""An SGLang frontend backend that sends a program's calls to a base-model deployment.

SGLang's frontend language (`sglang.lang`: `@sgl.function`, `gen`, `select`, `fork`, roles) runs
programs in its own interpreter (`sglang.lang.interpreter.StreamExecutor`), which hands every model
call to a *backend* object. `HandleBackend` is such a backend: each `gen` becomes a `complete` (or,
for `program.run(stream=True)`, a streamed `stream`) call and each `select` a set of
`prompt_logprobs` calls on the base-model deployment (`deployments/base_model.py`), through a Ray Serve
`DeploymentHandle`:

    backend = HandleBackend(serve.get_deployment_handle("BaseModel-tiny-chat", app_name="tandem"),
                            session_id="run-1", max_calls=32, timeout_s=60)
    state = my_program.run(question="...", backend=backend)      # or .run_batch([...], backend=...)

One backend object is one *run context*: its calls carry one Serve session id (so a
`ConsistentHashRouter` keeps them on one base-model replica, where the prompt prefix is warm) and
share one call budget and one deadline (`AgentLimitError`). A program's `fork` branches run in
SGLang's threads and call the same backend concurrently; that is safe (`DeploymentHandle` calls are
thread-safe and `.result()` is fine off the event loop). `run_batch` with one backend shares the
session and the limits across the batch.

Nothing is degraded silently: a sampling field, select method or interpreter feature the base model
cannot honour raises `UnsupportedFeatureError` naming it (see `SUPPORTED` below).

Chat roles (`sgl.system/user/assistant`) are rendered with an SGLang `ChatTemplate` derived from the
base model's own Hugging Face chat template; see `derive_chat_template`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, List

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate

from deployments.agents import wire
from deployments.agents.chat_template import ChatTemplateError, DerivedChatTemplate, derive_chat_template, render_with_template, unavailable_chat_template
from deployments.agents.errors import AgentLimitError, UnsupportedFeatureError
from deployments.replica import cancel_call
from sglang.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    TokenLengthNormalized,
    UnconditionalLikelihoodNormalized,
    token_length_normalized,
)
from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

logger = logging.getLogger("ray.serve")

# Temperatures at or below this are greedy, as in SGLang's RuntimeEndpoint.select.
GREEDY_TEMPERATURE = 1e-5

SUPPORTED = """\
gen: the sampling parameters exactly as the gateway's /generate maps them (deployments/agents/wire.py:
     SGLang's defaults, its checks, then max_tokens, stop, stop_token_ids, temperature (< 1e-6 greedy),
     top_p, top_k (-1 = off), ignore_eos, regex or json_schema (a JSON string), min_new_tokens,
     min_p, presence / frequency / repetition penalties, logit_bias), plus dtype
     int/float/bool/str (SGLang's REGEX_INT/FLOAT/BOOL/STR).
     return_logprob (+ top_logprobs_num, return_text_in_logprobs): the generated tokens' log-probs in
     meta_info (output_token_logprobs / output_top_logprobs, cumulative when streamed), as on /generate.
     Not supported (raise UnsupportedFeatureError): max_tokens 0 or None, n > 1 (use s.fork(n)),
     stop_regex, logprob_start_len other than -1 on a gen, regex together with dtype,
     images / video, API speculative execution (num_api_spec_tokens).
select: token_length_normalized (default), greedy_token_selection, unconditional_likelihood_normalized
     and custom ChoicesSamplingMethod subclasses, from the same per-token log-probs an SGLang server
     gives (base model's prompt_logprobs); temperature ~0 picks the method's decision, temperature > 0
     samples from softmax(criterion / temperature) for the two methods with a scalar criterion
     (greedy_token_selection / custom methods with temperature > 0 raise). An empty prompt raises.
join(mode="concate_and_append"): by text (SGLang's own path for backends without KV-cache merging);
     the KV-level concatenate_and_append raises.
"""


# -- the model context shared by the runs of one agent replica ---------------------------------------------


@dataclass
class ModelContext:
    """What a backend needs to know about its base model; fetched once, shared by many runs."""

    model_info: dict
    chat_template: ChatTemplate

    @classmethod
    def fetch(cls, handle, timeout_s: float = 60.0) -> "ModelContext":
        """Blocking (call it off the event loop): model_info + the chat template derived via render_chat."""
        info = handle.model_info.remote().result(timeout_s=timeout_s)
        name = info.get("model", "model")
        try:
            template = derive_chat_template(
                lambda msgs: handle.render_chat.remote(msgs).result(timeout_s=timeout_s), name=name
            )
        except TimeoutError:
            raise
        except ChatTemplateError as e:
            logger.warning("model %s: SGLang roles are unavailable: %s", name, e)
            template = unavailable_chat_template(name, str(e))
        except Exception as e:  # noqa: BLE001 - e.g. a model without a chat template (render_chat raises)
            cause = getattr(e, "cause", None) or e
            reason = f"rendering a probe conversation failed: {type(cause).__name__}: {cause}"
            logger.warning("model %s: SGLang roles are unavailable: %s", name, reason)
            template = unavailable_chat_template(name, reason)
        return cls(info, template)


# -- the backend -------------------------------------------------------------------------------------


class HandleBackend(BaseBackend):
    """SGLang backend over a base-model `DeploymentHandle` (see the module docstring).

    Args:
        handle: DeploymentHandle of a `BaseModel-<name>` deployment.
        session_id: Serve session id carried by every call (default: a fresh id).
        model_info, chat_template: from `model_info()` and `derive_chat_template`; fetched through
            the handle when omitted (blocking). `context` passes both at once (a `ModelContext`).
        max_calls: at most this many model calls (gen or select) in this backend's lifetime.
        timeout_s: deadline, counted from construction, for all calls.
    """

    is_chat_model = False  # read by SGLang's interpreter for API speculative execution

    def __init__(
        self,
        handle,
        session_id: str | None = None,
        *,
        model_info: dict | None = None,
        chat_template: ChatTemplate | None = None,
        context: ModelContext | None = None,
        max_calls: int | None = None,
        timeout_s: float | None = None,
    ):
        super().__init__()
        self.support_concate_and_append = False
        if context is None:
            if model_info is None or chat_template is None:
                fetched = ModelContext.fetch(handle)
                model_info = model_info or fetched.model_info
                chat_template = chat_template or fetched.chat_template
            context = ModelContext(model_info, chat_template)
        self.context = context
        self.model_info = context.model_info
        self.chat_template = context.chat_template
        self.max_model_len = int(self.model_info.get("max_model_len") or 0) or None
        self.session_id = session_id or uuid.uuid4().hex
        self._handle = handle.options(session_id=self.session_id)
        if max_calls is not None and (not isinstance(max_calls, int) or max_calls < 1):
            raise ValueError(f"max_calls must be an integer >= 1, got {max_calls!r}")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        self.max_calls = max_calls
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.calls = 0
        self.error: BaseException | None = None  # the first error any call raised
        self._lock = threading.Lock()
        self._aborted: AgentLimitError | None = None

    # -- run bookkeeping -----------------------------------------------------------------------------

    def _record(self, e: BaseException) -> BaseException:
        with self._lock:
            if self.error is None:
                self.error = e
        return e

    def abort(self, error: AgentLimitError) -> None:
        """Make every further call of this run raise `error` (the run's owner gave up on it)."""
        with self._lock:
            self._aborted = error
        self._record(error)

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _timeout_error(self, what: str) -> AgentLimitError:
        return AgentLimitError("timeout_s", self.timeout_s, f"while waiting for {what}")

    def _begin_call(self, what: str) -> int:
        with self._lock:
            if self._aborted is not None:
                raise self._aborted
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise self._timeout_error(f"the next call ({what})")
            if self.max_calls is not None and self.calls >= self.max_calls:
                raise AgentLimitError("max_calls", self.max_calls, f"call {self.calls + 1} ({what}) refused")
            self.calls += 1
            return self.calls

    def _result(self, response, what: str):
        remaining = self._remaining()
        try:
            return response.result(timeout_s=None if remaining is None else max(remaining, 0.001))
        except TimeoutError:
            cancel_call(response)
            raise self._timeout_error(what) from None

    # -- BaseBackend ------------------------------------------------------------------------------------

    def get_model_name(self):
        return self.model_info.get("model")

    def get_server_info(self):
        return dict(self.model_info)

    def get_chat_template(self):
        return self.chat_template

    def cache_prefix(self, prefix_str: str):
        pass  # prefix caching is the engine's business; session affinity keeps the prefix on one replica

    def commit_lazy_operations(self, s):
        self._check_program(s)  # (SGLang's fork(n > 1) hook: nothing to commit over a handle)

    def fill_image(self, s):
        raise self._record(UnsupportedFeatureError("images (sgl.image / sgl.video)"))

    def concatenate_and_append(self, src_rids, dst_rid):
        raise self._record(
            UnsupportedFeatureError(
                "concatenate_and_append (KV-cache join)", 'join(mode="concate_and_append") works by text here'
            )
        )

    def _check_program(self, s) -> None:
        if getattr(s, "images_", None):
            raise UnsupportedFeatureError("images (sgl.image / sgl.video)")
        if getattr(s, "num_api_spec_tokens", None) is not None:
            raise UnsupportedFeatureError("API speculative execution (@sgl.function(num_api_spec_tokens=...))")

    # -- gen ----------------------------------------------------------------------------------------------

    def sampling_kwargs(self, sp: SglSamplingParams) -> dict[str, Any]:
        """SglSamplingParams -> the base model's sampling keyword arguments, as `/generate` maps the same
        parameters (deployments/agents/wire.py); every field is checked."""
        unsupported = UnsupportedFeatureError
        # What RuntimeEndpoint sends to an SGLang server's /generate; the rest is the frontend's own.
        srt = sp.to_srt_kwargs()
        handled = set(srt)

        def take(name):
            handled.add(name)
            return getattr(sp, name)

        # Log-probs of the generated tokens, in meta_info as SGLang's server gives them (`_meta`).
        return_logprob, top = bool(take("return_logprob")), take("top_logprobs_num") or 0
        take("return_text_in_logprobs")
        if take("logprob_start_len") not in (None, -1):
            raise unsupported("logprob_start_len", "a gen call gives its generated tokens' log-probs only (leave it at -1)")
        if top and not return_logprob:
            raise unsupported("top_logprobs_num without return_logprob", f"top_logprobs_num={top}")

        # dtype -> SGLang's own regexes, as RuntimeEndpoint._handle_dtype_to_regex does.
        dtype = take("dtype")
        if dtype is not None:
            if srt["regex"] is not None:
                raise unsupported("regex together with dtype", f"dtype={dtype!r}, regex={srt['regex']!r}; give one")
            stop = [srt["stop"]] if isinstance(srt["stop"], str) else list(srt["stop"] or [])
            if dtype in ("int", int):
                srt["regex"] = REGEX_INT
                stop += [" ", "\n"]
            elif dtype in ("float", float):
                srt["regex"] = REGEX_FLOAT
                stop += [" ", "\n"]
            elif dtype in ("str", str):
                srt["regex"] = REGEX_STR
            elif dtype in ("bool", bool):
                srt["regex"] = REGEX_BOOL
            else:
                raise ValueError(f"dtype must be int, float, str or bool, got {dtype!r}")
            srt["stop"] = stop

        # Every field of SglSamplingParams must have been looked at: a new SGLang field must not be
        # dropped silently when it is set.
        for f in dataclasses.fields(sp):
            if f.name not in handled and getattr(sp, f.name) not in (None, f.default, (), []):
                raise unsupported(f"sampling parameter {f.name}", f"{f.name}={getattr(sp, f.name)!r}")

        try:
            out = wire.to_tandem(srt)
        except wire.UnsupportedSamplingError as e:
            raise unsupported(f"sampling parameters {e.feature}") from None
        if self.max_model_len and out["max_tokens"] >= self.max_model_len:
            raise wire.SamplingParamError(
                "max_new_tokens",
                f"max_new_tokens={out['max_tokens']} does not fit the model's context of {self.max_model_len} tokens",
            )
        if return_logprob:
            out["logprobs"] = top
        return out

    @staticmethod
    def _logprob_meta(sp: SglSamplingParams, entries: list | None) -> dict:
        if not sp.return_logprob:
            return {}
        return wire.output_logprobs(entries, sp.top_logprobs_num or 0, bool(sp.return_text_in_logprobs))

    def _meta(self, last: dict, call: int, request_id: str, replica: str | None = None) -> dict:
        """SGLang-shaped meta_info from a `complete` result or a `stream` delta."""
        usage = last.get("usage") or last  # complete() nests the counts under usage; deltas do not
        completion_tokens = usage.get("completion_tokens")
        finish = wire.finish_reason(last.get("finish_reason"), last.get("stop_reason"), completion_tokens)
        extra = {"session_id": self.session_id, "call": call}
        if replica is not None:
            extra["replica"] = replica
        return wire.meta_info(request_id, usage.get("prompt_tokens"), completion_tokens, finish, **extra)

    def generate(self, s, sampling_params: SglSamplingParams):
        try:
            self._check_program(s)
            kwargs = self.sampling_kwargs(sampling_params)
            call = self._begin_call("gen")
            request_id = f"{self.session_id}-{call}"
            response = self._handle.complete.remote(prompt=s.text_, request_id=request_id, **kwargs)
            out = self._result(response, f"gen call {call}")
            meta = self._meta(out, call, request_id, out.get("replica"))
            return out["text"], {**meta, **self._logprob_meta(sampling_params, out.get("logprobs"))}
        except BaseException as e:
            raise self._record(e)

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        try:
            self._check_program(s)
            kwargs = self.sampling_kwargs(sampling_params)
            call = self._begin_call("gen")
            request_id = f"{self.session_id}-{call}"
            stream = self._handle.options(stream=True).stream.remote(prompt=s.text_, request_id=request_id, **kwargs)
            remaining = self._remaining()
            timer = None
            if remaining is not None:
                timer = threading.Timer(max(remaining, 0.001), stream.cancel)
                timer.daemon = True
                timer.start()
            finished = False
            entries: list = []  # SGLang's meta_info log-probs are cumulative, like its text
            try:
                for delta in stream:
                    finished = delta.get("finish_reason") is not None
                    entries += delta.get("logprobs") or []
                    yield delta["text"], {**self._meta(delta, call, request_id), **self._logprob_meta(sampling_params, entries)}
            except Exception:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise self._timeout_error(f"streamed gen call {call}") from None
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if not finished:
                    cancel_call(stream)
        except BaseException as e:
            if not isinstance(e, GeneratorExit):
                self._record(e)
            raise

    # -- select -------------------------------------------------------------------------------------------

    def _logprobs(self, call: int, **kwargs) -> dict:
        return self._result(self._handle.prompt_logprobs.remote(**kwargs), f"select call {call}")

    def select(self, s, choices: List[str], temperature: float, choices_method: ChoicesSamplingMethod | None = None):
        try:
            return self._select(s, choices, temperature, choices_method or token_length_normalized)
        except BaseException as e:
            raise self._record(e)

    def _select(self, s, choices, temperature, method) -> ChoicesDecision:
        """SGLang's RuntimeEndpoint.select, over the base model's `prompt_logprobs`: the same
        log-probabilities (from two tokens before the end of the prompt, with the same token-healing
        correction), so every ChoicesSamplingMethod decides exactly as it does on an SGLang server."""
        self._check_program(s)
        choices = [str(c) for c in choices]
        if not choices:
            raise ValueError("select needs at least one choice")
        if temperature is None or temperature < 0:
            raise ValueError(f"select temperature must be >= 0, got {temperature!r}")
        sampled = temperature > GREEDY_TEMPERATURE
        if sampled and type(method) not in (TokenLengthNormalized, UnconditionalLikelihoodNormalized):
            raise UnsupportedFeatureError(
                f"select with temperature > 0 and {type(method).__name__}",
                "only token_length_normalized and unconditional_likelihood_normalized have a score to sample from",
            )
        call = self._begin_call("select")
        text = s.text_
        if not text:
            raise ValueError("select needs a non-empty prompt: there is no context to score the choices against")

        prompt_len = self._logprobs(call, prompt=text, start=-1)["prompt_tokens"]
        start = max(prompt_len - 2, 0)  # for token healing, as SGLang does
        responses = [self._handle.prompt_logprobs.remote(prompt=text + c, start=start) for c in choices]
        input_token_logprobs = [
            [tuple(t) for t in self._result(r, f"select call {call}")["input_token_logprobs"]] for r in responses
        ]
        normalized = [_normalized_logprob(lps) for lps in input_token_logprobs]
        # Remove the extra token where no token healing occurred (the prompt's own last token).
        for i, lps in enumerate(input_token_logprobs):
            if len(lps) > 1 and text.endswith(lps[0][2]):
                first = lps[0][0] or 0.0
                normalized[i] = (normalized[i] * len(lps) - first) / (len(lps) - 1)
                input_token_logprobs[i] = lps[1:]
        unconditional = None
        if method.requires_unconditional_logprobs:
            responses = [
                self._handle.prompt_logprobs.remote(prompt_token_ids=[t[1] for t in lps])
                for lps in input_token_logprobs
            ]
            unconditional = [
                [tuple(t) for t in self._result(r, f"select call {call}")["input_token_logprobs"]] for r in responses
            ]
        decision = method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
        if sampled:
            key = (
                "normalized_unconditional_prompt_logprobs"
                if isinstance(method, UnconditionalLikelihoodNormalized)
                else "normalized_prompt_logprobs"
            )
            criterion = decision.meta_info[key]
            top = max(criterion)
            weights = [math.exp((c - top) / temperature) for c in criterion]
            decision = ChoicesDecision(
                decision=random.choices(choices, weights=weights)[0],
                meta_info={**decision.meta_info, "temperature": temperature},
            )
        decision.meta_info = {**(decision.meta_info or {}), "session_id": self.session_id, "call": call}
        return decision


def _normalized_logprob(input_logprobs) -> float:
    """SGLang's compute_normalized_prompt_logprobs (the mean of the known log-probs)."""
    values = [x[0] for x in input_logprobs if x[0]]
    return sum(values) / len(values) if values else 0.0


__all__ = [
    "AgentLimitError",
    "ChatTemplateError",
    "DerivedChatTemplate",
    "HandleBackend",
    "ModelContext",
    "UnsupportedFeatureError",
    "derive_chat_template",
    "render_with_template",
    "SUPPORTED",
]
