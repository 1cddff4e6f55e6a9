"""The errors of agent runs. Light on purpose: the gateway imports them to map a run's failure to an
HTTP status without importing SGLang. Each keeps its fields across processes (`__reduce__`)."""

from __future__ import annotations


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


class AgentArgumentError(ValueError):
    """A run's arguments do not fit the program's signature: `argument` names the one at fault
    (None when the arguments as a whole are wrong, e.g. not an object)."""

    def __init__(self, message: str, argument: str | None = None):
        self.message = message
        self.argument = argument
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.message, self.argument))


class AgentProgramError(Exception):
    """The agent's program raised (or one of its model calls failed)."""

    def __init__(self, program: str, message: str, error_type: str = "Exception"):
        self.program = program
        self.message = message
        self.error_type = error_type
        super().__init__(f"agent program {program} failed: {error_type}: {message}")

    def __reduce__(self):
        return (type(self), (self.program, self.message, self.error_type))


class RunCancelledError(Exception):
    """The caller of a run went away; the run's further model calls are refused."""
