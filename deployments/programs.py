"""The built-in agent programs under their original import path (`deployments.programs:<name>`,
as configs written before `deployments/agents/` name them). They live in `deployments/agents/programs.py`."""

from deployments.agents.programs import *  # noqa: F401,F403
from deployments.agents.programs import __all__  # noqa: F401
