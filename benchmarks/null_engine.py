"""A compute-free engine, for benchmarks only: it measures Tandem's serving path, not a model.

`NullEngine` implements the engine seam (`deployments/engines/engine.py`) without a model. Each
request "generates" a fixed cycle of token ids of the built-in tiny model's tokenizer (they spell
" The quick brown fox jumps over the lazy dog."), one id per step, as fast as asked: an optional
per-token delay (`engine_args: {"delay_s": ...}`, default 0), and `await asyncio.sleep(...)` between
tokens either way, so the replica's event loop serves other requests between steps as it does with
a real engine. Deltas are built by `text.DeltaMapper` exactly as the transformers engine builds
them (incremental detokenization, stop strings, stop token ids, usage), so what reaches the
gateway is what a real engine sends. Prompts are tokenized and checked as every engine does
(`Engine._prompt_token_ids`, `_check_fits`). It honours `max_tokens` (finish "length"), and
`ignore_eos`: with `engine_args: {"eos_after": N}` a request not ignoring EOS stops with "stop" after
N tokens (default: never; every stream runs to max_tokens). `prompt_logprobs` returns 0.0 for
every token (no model); `score` works on top of it.

It is not offered to users: it is not in the engine registry's table. `NullBaseModelServer` (Tandem's
own `BaseModelServer`, unchanged but for registering this engine in its replica's process) and
`build_null_app` (the app graph of `cluster/app.py`'s `build()`, with that deployment in place of
`BaseModelDeployment`) put it inside Tandem's real gateway -> base-model path. Used by
`benchmarks/path_cost.py` and `benchmarks/profile_path.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from deployments.base_model import BaseModelServer
from deployments.engines.engine import (
    Delta,
    Engine,
    EngineStats,
    GenerationRequest,
    RateMeter,
    validate_sampling,
)
from deployments.engines.text import DeltaMapper

NAME = "null"
SOURCE = "builtin:tiny-chat"
#: The text the token cycle spells (tokenized with the tiny model's tokenizer once, at start).
CYCLE_TEXT = " The quick brown fox jumps over the lazy dog."


def cycle_ids(tokenizer) -> list[int]:
    """The token ids the null engine (and the bare Serve app of path_cost.py) stream, in order."""
    return list(tokenizer(CYCLE_TEXT, add_special_tokens=False)["input_ids"])


class NullEngine(Engine):
    """See the module docstring. `engine_args`: `delay_s` (seconds per token, default 0),
    `eos_after` (tokens before an EOS when the request does not ignore it; default None: never),
    `max_model_len` (default 65536: any benchmark stream fits)."""

    name = NAME

    def __init__(self, model_path: str, engine_args: dict, *, tokenizer=None, device_count: int = 1):
        unknown = set(engine_args) - {"delay_s", "eos_after", "max_model_len"}
        if unknown:
            raise ValueError(f"unknown engine_args for the null engine: {sorted(unknown)}")
        self._model_path = model_path
        self._delay_s = float(engine_args.get("delay_s", 0.0))
        self._eos_after = engine_args.get("eos_after")
        self._max_model_len = int(engine_args.get("max_model_len", 65536))
        self._tokenizer = tokenizer
        self._started = False
        self._running = 0
        self._rate = RateMeter()
        self._cycle: list[int] = []
        self._eos_id: int | None = None

    async def start(self) -> None:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        self._vocab_size = len(self._tokenizer)
        self._cycle = cycle_ids(self._tokenizer)
        self._eos_id = self._tokenizer.eos_token_id
        self._started = True

    async def shutdown(self) -> None:
        self._started = False

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.check_health()
        sp = request.sampling
        validate_sampling(sp, self._vocab_size)
        prompt_ids = await self._prompt_token_ids(request)
        self._check_fits(len(prompt_ids), sp.max_tokens)
        mapper = DeltaMapper(self._tokenizer, sp, prompt_ids)
        stops_at_eos = not sp.ignore_eos and self._eos_after is not None and self._eos_id is not None
        cycle, n = self._cycle, len(self._cycle)
        self._running += 1
        try:
            for i in range(sp.max_tokens):
                # One decode "step": the event loop gets a turn first, as with a real engine.
                await asyncio.sleep(self._delay_s)
                finish = matched = None
                if stops_at_eos and i == self._eos_after:
                    token, finish, matched = self._eos_id, "stop", self._eos_id
                else:
                    token = cycle[i % n]
                    if i == sp.max_tokens - 1:
                        finish = "length"
                self._rate.add(1)
                delta = mapper.feed([token], finish, matched)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return  # also a stop string or stop token id (DeltaMapper ended it)
        finally:
            self._running -= 1

    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        self.check_health()
        sequences = self._logprob_sequences(token_ids)
        return [[None, *([0.0] * (len(ids) - 1))] if ids else [] for ids in sequences]

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, tokens_per_s=self._rate.rate(), healthy=self.healthy())

    def _health_error(self) -> str | None:
        return None if self._started else self._not_started()


def register_null_engine() -> None:
    """Adds the null engine to the engine registry's table of this process (a replica's): the
    table stays the one way `BaseModelServer` creates engines, and users never see this entry."""
    from deployments.engines.registry import ENGINES, EngineInfo

    ENGINES.setdefault(
        NAME, EngineInfo(name=NAME, adapter=f"{__name__}:NullEngine", accelerators=("cpu",), library="transformers")
    )


# -- inside Tandem's deployment ----------------------------------------------------------------


class NullBaseModelServer(BaseModelServer):
    """Tandem's base-model replica, unchanged, with the null engine: `BaseModelServer.__init__`
    creates its engine by name from the registry, so the only override registers the null engine
    in this replica's process before it runs (everything else: tokenizer, chat template, stream
    merging per `stream_interval_ms`, metrics, handle methods, is Tandem's own)."""

    async def __init__(self, *args, **kwargs):
        register_null_engine()
        await super().__init__(*args, **kwargs)


def null_deployment():
    from ray import serve

    return serve.deployment(NullBaseModelServer, name="BaseModel")


def tandem_args(model: str, replica_cpus: float, gateway_cpus: float, stream_interval_ms: float,
                max_ongoing_requests: int = 256, stream_chunks_per_s: float = 200.0) -> dict[str, Any]:
    """The application args of the benchmark app (the schema of `cluster.yaml`): one model, one
    fixed replica. The config names the `transformers` engine so that it validates as any user
    config does; `build_null_app` swaps in the null engine."""
    return {
        "models": [
            {
                "name": model,
                "source": SOURCE,
                "engine": "transformers",
                "accelerator": {"kind": "cpu", "cpus": replica_cpus},
                "stream_interval_ms": stream_interval_ms,
                "stream_chunks_per_s": stream_chunks_per_s,
                "replicas": {"min": 1, "max": 1, "max_ongoing_requests": max_ongoing_requests},
            }
        ],
        "gateway": {"cpus": gateway_cpus},
    }


def build_null_app(args: dict[str, Any], delay_s: float = 0.0):
    """`cluster.app.build_app(args)`, with every model's deployment running the null engine: the
    same graph, deployment options, `pool_info` (`engine: "null"`) and gateway, through `build`'s
    seam for another deployment class and engine."""
    from cluster.app import build
    from cluster.resolve import parse_args

    return build(parse_args(args), base_model=null_deployment(), engine=(NAME, {"delay_s": delay_s}))
