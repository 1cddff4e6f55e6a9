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
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate
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
gen: max_tokens, stop (str or list), stop_token_ids, temperature, top_p, top_k (-1 = off), ignore_eos,
     regex, json_schema (a JSON string), dtype int/float/bool/str (SGLang's REGEX_INT/FLOAT/BOOL/STR).
     Not supported (raise UnsupportedFeatureError): n > 1 (use s.fork(n)), min_tokens > 0, stop_regex,
     min_p, frequency_penalty / presence_penalty != 0, return_logprob / logprob_start_len /
     top_logprobs_num / return_text_in_logprobs, max_tokens == 0, regex together with dtype or
     json_schema, images / video, API speculative execution (num_api_spec_tokens).
select: token_length_normalized (default), greedy_token_selection, unconditional_likelihood_normalized
     and custom ChoicesSamplingMethod subclasses, from the same per-token log-probs an SGLang server
     gives (base model's prompt_logprobs); temperature ~0 picks the method's decision, temperature > 0
     samples from softmax(criterion / temperature) for the two methods with a scalar criterion
     (greedy_token_selection / custom methods with temperature > 0 raise). An empty prompt raises.
join(mode="concate_and_append"): by text (SGLang's own path for backends without KV-cache merging);
     the KV-level concatenate_and_append raises.
"""


# -- errors -------------------------------------------------------------------------------------------


class AgentLimitError(Exception):
    """A run exceeded one of its limits: `limit` is "max_calls" or "timeout_s"."""

    def __init__(self, limit: str, value: float | int, detail: str = ""):
        self.limit = limit
        self.value = value
        self.detail = detail
        what = {
            "max_calls": f"the run exceeded its limit of {value} model calls (max_calls)",
            "timeout_s": f"the run exceeded its deadline of {value} s (timeout_s)",
        }.get(limit, f"the run exceeded its limit {limit}={value}")
        super().__init__(what + (f": {detail}" if detail else ""))

    def __reduce__(self):
        return (type(self), (self.limit, self.value, self.detail))


class UnsupportedFeatureError(ValueError):
    """The program asked for an SGLang feature the base model cannot honour."""

    def __init__(self, feature: str, detail: str = ""):
        self.feature = feature
        self.detail = detail
        super().__init__(
            f"SGLang feature not supported by Tandem's HandleBackend: {feature}" + (f" ({detail})" if detail else "")
        )

    def __reduce__(self):
        return (type(self), (self.feature, self.detail))


class ChatTemplateError(ValueError):
    """The model's chat template could not be turned into an SGLang ChatTemplate (or a role is unusable)."""


# -- chat template derivation ----------------------------------------------------------------------------


@dataclass
class DerivedChatTemplate(ChatTemplate):
    """An SGLang ChatTemplate derived from a model's HF chat template.

    `preamble` is text the HF template emits once before the first message (e.g. a BOS token); it is
    prepended to the prefix of whichever role comes first. Roles missing from `role_prefix_and_suffix`
    raise `ChatTemplateError` with the reason in `unsupported_roles` (instead of SGLang's default of
    rendering them with empty markers).
    """

    preamble: str = ""
    unsupported_roles: dict = field(default_factory=dict)

    def get_prefix_and_suffix(self, role: str, hist_messages: List[dict]):
        if role not in self.role_prefix_and_suffix:
            reason = self.unsupported_roles.get(role) or "the chat template has no such role"
            raise ChatTemplateError(f"role {role!r} cannot be used with model {self.name!r}: {reason}")
        prefix, suffix = self.role_prefix_and_suffix[role]
        if not hist_messages:
            prefix = self.preamble + prefix
        return prefix, suffix


def unavailable_chat_template(name: str, reason: str) -> DerivedChatTemplate:
    """A template whose roles all raise: programs without roles still run."""
    return DerivedChatTemplate(
        name=name,
        default_system_prompt=None,
        role_prefix_and_suffix={},
        unsupported_roles={r: reason for r in ("system", "user", "assistant")},
    )


# Probe contents: plain ASCII words (no whitespace, nothing a template would trim or escape).
_PROBE = {
    "S": "TandemProbeSystemQ7",
    "U1": "TandemProbeUserK3",
    "A": "TandemProbeAssistantW5",
    "U2": "TandemProbeUserZ9",
}
# Different contents for the round-trip check, with inner spaces and a newline.
_VERIFY = {
    "S": "Be brief.\nAnswer in English.",
    "U1": "What is 2 + 2?",
    "A": "2 + 2 = 4.",
    "U2": "And 3 + 5?",
}


def _split(text: str, markers: list[str], what: str) -> list[str]:
    """`text` cut at each marker (each must occur exactly once, in order): len(markers) + 1 pieces."""
    pieces, rest = [], text
    for m in markers:
        if text.count(m) != 1 or m not in rest:
            raise ChatTemplateError(
                f"rendering {what} did not contain the message content {m!r} exactly once, in order "
                f"(the template rewrites message contents): {text!r}"
            )
        before, rest = rest.split(m, 1)
        pieces.append(before)
    pieces.append(rest)
    return pieces


def _common_suffix(strings: list[str]) -> str:
    shortest = min(strings, key=len)
    n = 0
    while n < len(shortest) and all(s[len(s) - 1 - n] == shortest[len(shortest) - 1 - n] for s in strings):
        n += 1
    return shortest[len(shortest) - n :]


def _cut_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ChatTemplateError(f"cannot decompose the chat template: {what}: {text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)]


def _msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def render_with_template(template: ChatTemplate, messages: list[dict]) -> str:
    """Render `messages` + the generation prompt exactly as SGLang's interpreter would for
    `s.<role>(content)` calls followed by `s.assistant(gen(...))` (default system message included)."""
    text, hist = "", []
    if messages[0]["role"] != "system" and template.default_system_prompt:
        messages = [{"role": "system", "content": template.default_system_prompt}, *messages]
    for m in messages:
        prefix, suffix = template.get_prefix_and_suffix(m["role"], hist)
        text += prefix + m["content"] + suffix
        hist.append(m)
    return text + template.get_prefix_and_suffix("assistant", hist)[0]


def derive_chat_template(render: Callable[[list[dict]], str], name: str = "derived") -> DerivedChatTemplate:
    """Decompose a model's chat template into SGLang's per-role (prefix, suffix) form.

    `render(messages)` must return the prompt text of `messages` through the model's own template with
    `add_generation_prompt=True` (the base model's `render_chat`). The technique:

    1. Render probe conversations whose contents are unique marker words and cut each rendering at
       the markers. That yields the template's own text around the messages: the text before the
       first user message `pre_u`, the junctions user->assistant `j_ua`, assistant->user `j_au`,
       system->user `j_su`, the text after a final user turn `tail_u` (= user suffix + generation
       prompt) and after a final assistant turn `tail_a` (= assistant suffix + generation prompt).
    2. The user prefix is the longest common suffix of every text that leads into a user message
       (`j_au`, `j_su` and, when the template adds no default system prompt, `pre_u`). The assistant
       suffix is `j_au` minus that; the generation prompt is `tail_a` minus the assistant suffix; the
       user suffix is `tail_u` minus the generation prompt; the assistant prefix is `j_ua` minus the
       user suffix (it must equal the generation prompt); the system suffix is `j_su` minus the user
       prefix. Text before the first message that is not a role prefix (a BOS token) becomes
       `preamble`; a system block the template inserts when a conversation has none becomes
       `default_system_prompt` (SGLang inserts it the same way).
    3. The result is checked by rendering fresh conversations both ways (SGLang's composition and the
       model's template) and comparing the texts character for character.

    Any inconsistency raises `ChatTemplateError` saying what could not be decomposed. A template
    that rejects system messages yields a template without the system role (using it raises).
    Where a junction splits between one turn's ending and the next turn's prefix is not always
    observable (e.g. identical system and assistant endings in a template that inserts a default
    system prompt). Two rules settle it: a split never falls inside a bracketed special token
    (`<|eot_id|>`, `[INST]`), and when the longest user prefix would leave turns without an ending,
    the split after the junction's first special token (`<|im_end|>\n` | `<|im_start|>user\n`) is
    preferred if it is just as exact. Either way the rendered prompts are exact (step 3).
    """
    P = _PROBE

    def rend(msgs: list[dict]) -> str:
        text = render(msgs)
        if not isinstance(text, str):
            raise ChatTemplateError(f"render_chat returned {type(text).__name__}, not str")
        return text

    pre_u, tail_u = _split(rend(_msgs(("user", P["U1"]))), [P["U1"]], "[user]")
    pre_u2, j_ua, j_au, tail_u2 = _split(
        rend(_msgs(("user", P["U1"]), ("assistant", P["A"]), ("user", P["U2"]))),
        [P["U1"], P["A"], P["U2"]],
        "[user, assistant, user]",
    )
    if (pre_u2, tail_u2) != (pre_u, tail_u):
        raise ChatTemplateError(
            "cannot decompose the chat template: the text around a user turn depends on the turns "
            f"around it ({pre_u!r} / {tail_u!r} vs {pre_u2!r} / {tail_u2!r})"
        )
    _, j_ua_c, tail_a = _split(
        rend(_msgs(("user", P["U1"]), ("assistant", P["A"]))), [P["U1"], P["A"]], "[user, assistant]"
    )
    if j_ua_c != j_ua:
        raise ChatTemplateError(
            f"cannot decompose the chat template: the user->assistant junction differs ({j_ua!r} vs {j_ua_c!r})"
        )

    system_error = None
    try:
        pre_s, j_su, tail_s = _split(
            rend(_msgs(("system", P["S"]), ("user", P["U1"]))), [P["S"], P["U1"]], "[system, user]"
        )
        if tail_s != tail_u:
            raise ChatTemplateError(f"the text after a user turn depends on a system message ({tail_s!r} vs {tail_u!r})")
    except ChatTemplateError as e:
        system_error = str(e)
    except Exception as e:  # noqa: BLE001 - the template rejects system messages (raise_exception)
        cause = getattr(e, "cause", None) or e
        system_error = f"the chat template rejects a system message: {type(cause).__name__}: {cause}"

    default_system = None
    if system_error is None and pre_u.startswith(pre_s) and len(pre_u) > len(pre_s) + len(j_su) and pre_u.endswith(j_su):
        # [user] alone renders as [system <default>, user]: the template inserts a default system prompt.
        default_system = pre_u[len(pre_s) : len(pre_u) - len(j_su)]

    into_user = [j_au] + ([j_su] if system_error is None else []) + ([pre_u] if default_system is None else [])
    longest = _snap_to_token(j_au, _common_suffix(into_user))
    pieces = dict(
        render=rend, pre_u=pre_u, tail_u=tail_u, j_ua=j_ua, j_au=j_au, tail_a=tail_a,
        system=None if system_error else (pre_s, j_su), system_error=system_error, default_system=default_system,
    )
    template = _assemble(name, user_prefix=longest, **pieces)
    first_token = re.match(r"(<[^<>]*>|\[[^\[\]]*\])\s*", longest)
    if template.role_prefix_and_suffix["assistant"][1] == "" and first_token and first_token.end() < len(longest):
        # Ambiguous junction (see the docstring): the longest user prefix left turns without an ending;
        # prefer the split after the junction's first special token when it is just as exact.
        try:
            return _assemble(name, user_prefix=longest[first_token.end() :], **pieces)
        except ChatTemplateError:
            pass
    return template


def _snap_to_token(junction: str, suffix: str) -> str:
    """Shorten `suffix` (a suffix of `junction`) so that it does not start inside a bracketed special
    token such as `<|eot_id|>` or `[INST]`: character-wise common suffixes can reach into the end of
    different tokens that happen to end alike (`<s>` and `<|eot_id|>` both end with `>`)."""
    start = len(junction) - len(suffix)
    for open_, close in (("<", ">"), ("[", "]")):
        opened = junction.rfind(open_, 0, start)
        if opened >= 0 and junction.find(close, opened, start) < 0:
            closing = junction.find(close, start)
            if closing >= 0:
                start = closing + 1
    return junction[start:]


def _assemble(name, *, render, user_prefix, pre_u, tail_u, j_ua, j_au, tail_a, system, system_error, default_system):
    assistant_suffix = _cut_suffix(j_au, user_prefix, "assistant->user junction")
    if not tail_a.startswith(assistant_suffix):
        raise ChatTemplateError(
            "cannot decompose the chat template: after a final assistant turn it renders "
            f"{tail_a!r}, which does not start with the assistant turn ending {assistant_suffix!r}"
        )
    gen_prompt = tail_a[len(assistant_suffix) :]
    user_suffix = _cut_suffix(tail_u, gen_prompt, "text after the last user turn")
    if not j_ua.startswith(user_suffix):
        raise ChatTemplateError(
            f"cannot decompose the chat template: the user->assistant junction {j_ua!r} does not start "
            f"with the user turn ending {user_suffix!r}"
        )
    assistant_prefix = j_ua[len(user_suffix) :]
    if assistant_prefix != gen_prompt:
        raise ChatTemplateError(
            "cannot decompose the chat template: assistant turns in the history begin with "
            f"{assistant_prefix!r} but the generation prompt is {gen_prompt!r}"
        )
    roles = {"user": (user_prefix, user_suffix), "assistant": (assistant_prefix, assistant_suffix)}
    unsupported = {}
    if system is not None:
        pre_s, j_su = system
        system_suffix = _cut_suffix(j_su, user_prefix, "system->user junction")
        if default_system is not None:
            preamble, system_prefix = "", pre_s
        else:
            preamble = _cut_suffix(pre_u, user_prefix, "text before the first user message")
            if not pre_s.startswith(preamble):
                raise ChatTemplateError(
                    f"cannot decompose the chat template: the text before a first system message {pre_s!r} "
                    f"does not start with the preamble {preamble!r}"
                )
            system_prefix = pre_s[len(preamble) :]
        roles["system"] = (system_prefix, system_suffix)
    else:
        preamble = _cut_suffix(pre_u, user_prefix, "text before the first user message")
        unsupported["system"] = system_error

    end = assistant_suffix.strip()
    template = DerivedChatTemplate(
        name=name,
        default_system_prompt=default_system,
        role_prefix_and_suffix=roles,
        stop_str=(end,) if end else (),
        preamble=preamble,
        unsupported_roles=unsupported,
    )

    # Round trip on fresh conversations: SGLang's composition must equal the model's own rendering.
    V = _VERIFY
    checks = [
        _msgs(("user", V["U1"])),
        _msgs(("user", V["U1"]), ("assistant", V["A"]), ("user", V["U2"])),
    ]
    if system is not None:
        checks.append(_msgs(("system", V["S"]), ("user", V["U1"]), ("assistant", V["A"]), ("user", V["U2"])))
    for msgs in checks:
        expected, got = render(msgs), render_with_template(template, msgs)
        if expected != got:
            raise ChatTemplateError(
                f"cannot decompose the chat template: for roles {[m['role'] for m in msgs]} the derived "
                f"template renders {got!r} but the model's template renders {expected!r}"
            )
    return template


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
            response.cancel()
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
        """SglSamplingParams -> the base model's sampling keyword arguments; every field is checked."""
        out: dict[str, Any] = {}
        unsupported = UnsupportedFeatureError
        handled = set()

        def take(name):
            handled.add(name)
            return getattr(sp, name)

        max_new = take("max_new_tokens")
        if max_new is None:
            max_new = 128
        if isinstance(max_new, bool) or not isinstance(max_new, int):
            raise ValueError(f"max_tokens must be an integer, got {max_new!r}")
        if max_new == 0:
            raise unsupported("max_tokens=0 (prefix caching only)")
        if self.max_model_len and max_new >= self.max_model_len:
            raise ValueError(
                f"max_tokens={max_new} does not fit the model's context of {self.max_model_len} tokens"
            )
        out["max_tokens"] = max_new

        if take("min_new_tokens") not in (None, 0):
            raise unsupported("min_tokens", f"min_tokens={sp.min_new_tokens}")
        if take("n") not in (None, 1):
            raise unsupported("n > 1 in a single gen", f"n={sp.n}; fork the state instead: s.fork({sp.n})")
        if take("stop_regex"):
            raise unsupported("stop_regex", f"stop_regex={sp.stop_regex!r}; use stop strings")
        if take("min_p") not in (None, 0, 0.0):
            raise unsupported("min_p", f"min_p={sp.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if take(name) not in (None, 0, 0.0):
                raise unsupported(name, f"{name}={getattr(sp, name)}")
        for name in ("return_logprob", "return_text_in_logprobs"):
            if take(name):
                raise unsupported(name, "log-probabilities of generated tokens are not returned")
        if take("logprob_start_len") is not None:
            raise unsupported("logprob_start_len", "log-probabilities of generated tokens are not returned")
        if take("top_logprobs_num") not in (None, 0):
            raise unsupported("top_logprobs_num", "log-probabilities of generated tokens are not returned")

        stop = take("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        stop = list(stop)
        stop_ids = take("stop_token_ids")
        out["stop_token_ids"] = list(stop_ids or [])

        for name in ("temperature", "top_p"):
            value = take(name)
            if value is not None:
                out[name] = value
        top_k = take("top_k")
        if top_k is not None:
            if top_k == -1:
                out["top_k"] = 0  # SGLang: -1 disables; the base model: 0 disables
            elif isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1:
                out["top_k"] = top_k
            else:
                raise ValueError(f"top_k must be -1 (off) or an integer >= 1, got {top_k!r}")
        ignore_eos = take("ignore_eos")
        if ignore_eos is not None:
            out["ignore_eos"] = bool(ignore_eos)

        # Constraints: dtype -> SGLang's own regexes, as RuntimeEndpoint._handle_dtype_to_regex does.
        dtype, regex, schema = take("dtype"), take("regex"), take("json_schema")
        if dtype is not None:
            if regex is not None:
                raise unsupported("regex together with dtype", f"dtype={dtype!r}, regex={regex!r}; give one")
            if dtype in ("int", int):
                regex = REGEX_INT
                stop += [" ", "\n"]
            elif dtype in ("float", float):
                regex = REGEX_FLOAT
                stop += [" ", "\n"]
            elif dtype in ("str", str):
                regex = REGEX_STR
            elif dtype in ("bool", bool):
                regex = REGEX_BOOL
            else:
                raise ValueError(f"dtype must be int, float, str or bool, got {dtype!r}")
        if schema is not None and not isinstance(schema, str):
            raise ValueError(f"json_schema must be a JSON string (json.dumps(schema)), got {type(schema).__name__}")
        if schema is not None:
            try:
                json.loads(schema)
            except ValueError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if regex is not None and schema is not None:
            raise unsupported("regex/dtype together with json_schema", "give one constraint per gen")
        if regex is not None:
            out["regex"] = regex
        if schema is not None:
            out["json_schema"] = schema
        out["stop"] = list(dict.fromkeys(stop))  # dedupe, keep order

        # Every field of SglSamplingParams must have been looked at: a new SGLang field must not be
        # dropped silently when it is set.
        for f in dataclasses.fields(sp):
            if f.name not in handled and getattr(sp, f.name) not in (None, f.default, (), []):
                raise unsupported(f"sampling parameter {f.name}", f"{f.name}={getattr(sp, f.name)!r}")
        return out

    def _meta(self, last: dict, call: int, request_id: str, replica: str | None = None) -> dict:
        """SGLang-shaped meta_info from a `complete` result or a `stream` delta."""
        usage = last.get("usage") or last  # complete() nests the counts under usage; deltas do not
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        reason = last.get("finish_reason")
        if reason == "stop":
            finish = {"type": "stop", "matched": last.get("stop_reason")}
        elif reason == "length":
            finish = {"type": "length", "length": completion_tokens}
        elif reason == "abort":
            finish = {"type": "abort", "message": "the base model aborted the request"}
        else:
            finish = None
        meta = {
            "id": request_id,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": 0,
            "session_id": self.session_id,
            "call": call,
        }
        if replica is not None:
            meta["replica"] = replica
        return meta

    def generate(self, s, sampling_params: SglSamplingParams):
        try:
            self._check_program(s)
            kwargs = self.sampling_kwargs(sampling_params)
            call = self._begin_call("gen")
            request_id = f"{self.session_id}-{call}"
            response = self._handle.complete.remote(prompt=s.text_, request_id=request_id, **kwargs)
            out = self._result(response, f"gen call {call}")
            return out["text"], self._meta(out, call, request_id, out.get("replica"))
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
            try:
                for delta in stream:
                    finished = delta.get("finish_reason") is not None
                    yield delta["text"], self._meta(delta, call, request_id)
            except Exception:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise self._timeout_error(f"streamed gen call {call}") from None
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if not finished:
                    stream.cancel()
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
