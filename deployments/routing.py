"""Prefix-cache-aware routing of base-model requests (`routing: prefix` in the config).

Ray Serve LLM's `PrefixCacheAffinityRouter` keeps a prefix tree of the prompts each replica has
served and sends a request to the replica whose tree holds the longest prefix of its prompt (unless
the replicas' queues differ by more than a threshold; a prompt with no useful match goes to the
replica holding the least text). It reads the prompt from a positional request object with a
`messages` or `prompt` attribute, as Ray Serve LLM's ingress passes it. Tandem's callers (the
gateway, agent replicas, Python handles) call `stream(**job)` / `complete(...)` with keyword
arguments; this subclass shows the router the prompt of those keyword arguments, and changes
nothing else of its policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
# The class `ray.serve.llm.request_router` re-exports; that package imports all of Ray Serve LLM (pyarrow,
# cloud filesystems), which base-model callers do not need.
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """What the parent router looks for in a request's positional arguments."""

    prompt: Any


def prompt_of(kwargs: dict[str, Any]) -> Any:
    """The prompt of a base-model call's keyword arguments (messages, text, or token ids as characters:
    the tree matches prefixes of any sequence); None when there is none."""
    for key in ("messages", "prompt"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    if kwargs.get("prompt_token_ids") is not None:
        return "".join(map(chr, kwargs["prompt_token_ids"]))
    return None


class PromptPrefixRouter(PrefixCacheAffinityRouter):
    @staticmethod
    def _visible(pending_request: Optional[PendingRequest]) -> Optional[PendingRequest]:
        if pending_request is None or pending_request.args:
            return pending_request
        prompt = prompt_of(pending_request.kwargs or {})
        if prompt is None:
            return pending_request
        return dataclasses.replace(pending_request, args=[_Prompt(prompt)])

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        return await super().choose_replicas(candidate_replicas, self._visible(pending_request))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult):
        super().on_request_routed(self._visible(pending_request), replica_id, result)
