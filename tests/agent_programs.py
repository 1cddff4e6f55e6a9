"""SGLang programs used by tests/test_agents_runtime.py.

They live in their own module (not the test module) so that agent replicas can import them by path
(`tests.agent_programs:<name>`) without importing pytest fixtures.
"""

from __future__ import annotations

import json
import time

import sglang as sgl
from ray import serve
from sglang.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized

SYSTEM = "You are a helpful assistant."


@sgl.function
def gen_and_fork(s, question, stop=" wrote"):
    """Roles, gen with max_tokens / stop in two fork branches, then a full answer."""
    s += sgl.system(SYSTEM)
    s += sgl.user(question)
    forks = s.fork(2)
    forks[0] += sgl.assistant(sgl.gen("out", max_tokens=3, temperature=0))
    forks[1] += sgl.assistant(sgl.gen("out", stop=stop, max_tokens=16, temperature=0))
    forks.join()
    s["finish"] = [f.get_meta_info("out")["finish_reason"] for f in forks.states]
    s += sgl.assistant(sgl.gen("answer", max_tokens=24, temperature=0))


METHODS = {
    "token_length_normalized": token_length_normalized,
    "greedy_token_selection": greedy_token_selection,
    "unconditional_likelihood_normalized": unconditional_likelihood_normalized,
}


@sgl.function
def choose(s, question, choices, method="token_length_normalized", select_temperature=0.0):
    """`select` among the client's choices with one of SGLang's choice methods."""
    s += sgl.user(question)
    s += sgl.assistant(
        sgl.select("answer", choices=list(choices), temperature=select_temperature, choices_method=METHODS[method])
    )
    # The scores the method decided on, and the temperature when the choice was sampled.
    keep = ("normalized_prompt_logprobs", "normalized_unconditional_prompt_logprobs", "temperature")
    s["meta"] = {k: v for k, v in s.get_meta_info("answer").items() if k in keep}


@sgl.function
def constrained(s, question="What is 7 * 6?"):
    """Regex, dtype=int and json_schema constraints."""
    s += sgl.user(question)
    s += sgl.assistant("The answer is " + sgl.gen("number", dtype=int, max_tokens=8, temperature=0))
    s += sgl.user("Give a code like 123-45.")
    s += sgl.assistant(sgl.gen("code", regex=r"[0-9]{3}-[0-9]{2}", max_tokens=10, temperature=0))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    s += sgl.user("Reply in JSON.")
    s += sgl.assistant(sgl.gen("answer", json_schema=json.dumps(schema), max_tokens=16, temperature=0))


@sgl.function
def story(s, question="Tell me a story.", second="Describe the ocean."):
    """Two long answers, for streaming: variables `first` then `answer`."""
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("first", max_tokens=40, temperature=0))
    s += sgl.user(second)
    s += sgl.assistant(sgl.gen("answer", max_tokens=40, temperature=0))


@sgl.function
def raising(s, question):
    """Makes one call, then fails with a message that names the question."""
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("draft", max_tokens=4, temperature=0))
    if s["draft"] is not None:
        raise RuntimeError(f"cannot handle {question!r}")


@sgl.function
def unsupported(s, question, feature="n"):
    """Asks for an SGLang feature the base model cannot honour."""
    s += sgl.user(question)
    kwargs = {"n": {"n": 2}, "stop_regex": {"stop_regex": "a+"}}[feature]
    s += sgl.assistant(sgl.gen("answer", max_tokens=4, **kwargs))


@sgl.function
def loop_calls(s, question, calls=3, pause_s=0.0):
    """`calls` sequential gens, sleeping `pause_s` before each: for the max_calls / timeout_s limits."""
    s += question
    for i in range(int(calls)):
        time.sleep(float(pause_s))
        s += " " + sgl.gen(f"step{i}", max_tokens=2, temperature=0)
        s[f"step{i}"]  # wait for it
    s["answer"] = "done"


SUITE = {
    f.func.__name__: f for f in (gen_and_fork, choose, constrained, story, raising, unsupported)
}


@sgl.function
def suite(s, program, arguments=None):
    """Runs one of the test programs above (by name) on this state: one agent replica hosts them all,
    which keeps the test application small. `arguments` are that program's arguments."""
    SUITE[program].func(s, **(arguments or {}))


@serve.deployment(name="AgentIndex", ray_actor_options={"num_cpus": 0.01})
class AgentIndex:
    """Ingress of the test application: holds the agent deployments so one serve.run starts them all."""

    def __init__(self, agents: dict):
        self.agents = agents

    def names(self) -> list[str]:
        return sorted(self.agents)
