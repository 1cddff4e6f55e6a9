"""Parsers of model output above the engines: tool calls and reasoning.

Engines stream text deltas only; the gateway turns them into OpenAI
``tool_calls`` and ``reasoning_content`` with these. Pure standard library,
so the gateway process can import them (see the import-linter contracts).
"""

from __future__ import annotations

from cluster.parsers.reasoning import (
    REASONING_PARSERS,
    ReasoningParser,
    get_reasoning_parser,
)
from cluster.parsers.tool_calls import (
    TOOL_CALL_PARSERS,
    ContentDelta,
    Event,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    collect,
    detect_tool_call_parser,
    get_tool_call_parser,
    new_call_id,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "ContentDelta",
    "Event",
    "ReasoningParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "collect",
    "detect_tool_call_parser",
    "get_reasoning_parser",
    "get_tool_call_parser",
    "new_call_id",
]
