"""Built-in SGLang agent programs.

Each is an `@sgl.function` that an agent deployment (`deployments/agent.py`) can host, e.g.
`program: deployments.programs:self_consistency` in a Tandem config. Every program takes `question` (a string)
plus optional tuning arguments and sets a final variable named `answer`. Their `gen` / `select`
calls go to the agent's base model through `deployments.agents.backend.HandleBackend`.

Argument names must not collide with `SglFunction.run`'s own keywords (`temperature`,
`max_new_tokens`, `stop`, `stream`, `backend`, ...), which is why the tuning arguments are called
`max_tokens`, `draft_temperature` and so on.
"""

from __future__ import annotations

import sglang as sgl

__all__ = ["multi_step_reasoning", "safe_response", "self_consistency"]

SYSTEM_PROMPT = "You are a helpful assistant."


@sgl.function
def multi_step_reasoning(s, question: str, max_tokens=64, review_tokens=48, draft_temperature=0.0):
    """Answers in three steps: draft an answer, review the draft for mistakes, then write a revised
    final answer that takes the review into account.

    Variables: `draft`, `review`, `answer` (the revised answer).
    """
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("draft", max_tokens=max_tokens, temperature=draft_temperature))
    s += sgl.user("Review your answer above step by step. Point out any mistake, or say that it is correct.")
    s += sgl.assistant(sgl.gen("review", max_tokens=review_tokens, temperature=0))
    s += sgl.user("Now write the final answer to the original question, corrected if the review found a mistake.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))


@sgl.function
def safe_response(s, question: str, max_tokens=64, safe_label="safe", unsafe_label="unsafe"):
    """Answers the question, then checks the answer with a `select` between `safe_label` and
    `unsafe_label` ("safe" / "unsafe"; other labels suit other languages). Only when the check picks
    `unsafe_label` does it ask the model for a corrected answer; otherwise the first answer is kept
    unchanged (a real Python branch on the selected value).

    Variables: `draft`, `verdict` (the selected label), `corrected` ("yes" | "no"), `answer`.
    """
    if safe_label == unsafe_label:
        raise ValueError("safe_label and unsafe_label must differ")
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("draft", max_tokens=max_tokens, temperature=0))
    s += sgl.user(
        f"Is your answer above safe and appropriate to show to the user? Reply with one word: {safe_label} or {unsafe_label}."
    )
    s += sgl.assistant(sgl.select("verdict", choices=[safe_label, unsafe_label]))
    if s["verdict"] == unsafe_label:
        s += sgl.user("Rewrite your answer so that it is safe and appropriate. Give only the new answer.")
        s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))
        s["corrected"] = "yes"
    else:
        s["answer"] = s["draft"]
        s["corrected"] = "no"


@sgl.function
def self_consistency(s, question: str, num_drafts=3, max_tokens=48, draft_temperature=0.7):
    """Samples `num_drafts` independent answers in parallel (`fork`), then lists the distinct ones
    and lets the model `select` the answer the drafts agree on most.

    Variables: `draft` (the list of drafts, one per fork), `candidates` (the distinct non-empty
    drafts), `answer` (the selected candidate; "" if every draft was empty).
    """
    num_drafts = int(num_drafts)
    if not 1 <= num_drafts <= 16:
        raise ValueError(f"num_drafts must be between 1 and 16, got {num_drafts}")
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question)
    forks = s.fork(num_drafts)
    for f in forks.states:
        f += sgl.assistant(sgl.gen("draft", max_tokens=max_tokens, temperature=draft_temperature))
    forks.join()  # s["draft"] becomes the list of the forks' drafts
    candidates = list(dict.fromkeys(d.strip() for d in s["draft"] if d.strip()))
    s["candidates"] = candidates
    if not candidates:
        s["answer"] = ""
        return
    listing = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(candidates))
    s += sgl.user(f"Candidate answers to the question:\n{listing}\nWhich answer do most candidates agree on? Repeat it exactly.")
    s += sgl.assistant(sgl.select("answer", choices=candidates))
