"""SGLang roles for any model: an SGLang `ChatTemplate` derived from the model's own Hugging Face chat
template, by rendering probe conversations and cutting them at the markers (see
`derive_chat_template`). Used by the agents' handle backend so `sgl.user(...)` / `sgl.assistant(...)`
render exactly as the model was trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, List

from sglang.lang.chat_template import ChatTemplate


class ChatTemplateError(ValueError):
    """The model's chat template could not be turned into an SGLang ChatTemplate (or a role is unusable)."""




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


