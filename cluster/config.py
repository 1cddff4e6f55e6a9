"""The Tandem application config schema: the `args` of the application in a Ray Serve config file.

Pure pydantic, a leaf of the import graph: it imports nothing of Tandem's, so every layer may use it.
Checks that need engines, model files or placement (engine names, `auto`, engine_args, programs)
are in `cluster/resolve.py`, which also reads config files. A bad value raises `ConfigError`, whose
message names the field's path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

APP_BUILDER = "cluster.app:build_app"
AGENT_MODEL_PREFIX = "agent:"


class ConfigError(ValueError):
    """A config that cannot be deployed; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid Tandem config:\n" + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    # Unknown keys are rejected: a typo in a config must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AcceleratorSpec(_Strict):
    """What one replica needs. `count` > 1 means tensor parallelism over that many devices."""

    kind: Literal["cpu", "gpu", "npu"] = "cpu"
    count: PositiveInt = 1
    type: str | None = Field(default=None, description="Ray accelerator type, e.g. H100, A100, Ascend910B")
    cpus: PositiveFloat = 1.0
    labels: dict[str, str] = Field(
        default_factory=dict, description="node labels a replica's node must have (Ray label selector), e.g. {zone: us-east1-a}"
    )

    @model_validator(mode="after")
    def _cpu_has_no_devices(self) -> "AcceleratorSpec":
        if self.kind == "cpu" and self.type is not None:
            raise ValueError(f"type {self.type!r} only applies to kind 'gpu' or 'npu'; remove it for kind 'cpu'")
        if self.kind == "cpu" and self.count != 1:
            raise ValueError(f"count {self.count} only applies to kind 'gpu' or 'npu'; CPU replicas use 'cpus'")
        return self


class ReplicaSpec(_Strict):
    min: NonNegativeInt = 1
    max: PositiveInt = 1
    initial: NonNegativeInt | None = None
    target_ongoing_requests: PositiveFloat = 8.0
    max_ongoing_requests: PositiveInt = 64
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)
    # Engine signals (reported by replicas through record_autoscaling_stats), per replica: when set,
    # the autoscaler also adds replicas while requests wait in engine queues or the KV cache fills.
    target_waiting_requests: PositiveFloat | None = None
    target_kv_cache_usage: float | None = Field(default=None, gt=0, le=1)
    max_replicas_per_node: PositiveInt | None = None
    cold_start_timeout_s: PositiveFloat = Field(
        default=300.0, description="how long a request waits for a pool with no running replica (min 0: scaling from zero) before a 503"
    )
    drain_timeout_s: PositiveFloat = Field(
        default=120.0, description="a replica being scaled down finishes its in-flight requests for up to this long"
    )
    max_queued_requests: PositiveInt | None = Field(
        default=256,
        description="requests each caller (a gateway or agent replica) queues while every replica is at max_ongoing_requests; "
        "beyond it, 503 with Retry-After at once; null: unbounded",
    )

    @model_validator(mode="after")
    def _bounds(self) -> "ReplicaSpec":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must lie between min ({self.min}) and max ({self.max})")
        if self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                f"target_ongoing_requests ({self.target_ongoing_requests})"
            )
        return self


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")


def _check_name(v: str, slash: bool = True) -> str:
    if not _NAME.match(v) or (not slash and "/" in v):
        raise ValueError(f"use letters, digits and . _ -{' /' if slash else ''} only, starting with a letter or digit")
    return v


class ServingSpec(_Strict):
    """What a group of replicas runs: an engine on an accelerator, in a Ray runtime_env."""

    # An engine of the registry (deployments/engines/registry.py) or "auto"; checked against the
    # registry by cluster/resolve.py, so the names are written in one place.
    engine: str = "auto"
    accelerator: AcceleratorSpec = AcceleratorSpec()
    engine_args: dict[str, Any] = Field(default_factory=dict)
    runtime_env: dict[str, Any] | None = Field(
        default=None, description="Ray runtime_env for these replicas; unset: the engine's default, {}: the node's own environment"
    )


class PoolSpec(ServingSpec):
    """One of several replica groups serving the same model name (e.g. GPUs in one pool, NPUs in another)."""

    name: str
    source: str | None = Field(default=None, description="default: the model's source")
    replicas: ReplicaSpec = ReplicaSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, slash=False)


class ModelSpec(ServingSpec):
    name: str = Field(description='the OpenAI "model" id')
    source: str = Field(description="HF model dir | HF repo id | builtin:<name>")
    replicas: ReplicaSpec = ReplicaSpec()
    stream_interval_ms: float = Field(
        default=20.0, ge=0, le=1000,
        description="after the first token, stream deltas merged per this interval (0: one message per token)",
    )
    stream_chunks_per_s: float = Field(
        default=200.0, ge=0,
        description=(
            "each replica's budget of streamed messages per second, shared by its live streams: with N streams, "
            "each one's interval is at least N / this (more tokens per message under load; 0: no budget)"
        ),
    )
    pools: list[PoolSpec] = Field(default_factory=list, description="several pools for this one model name")
    tool_call_parser: str | None = Field(
        default="auto",
        description=(
            "how tool calls are found in the model's text for tool_choice auto: a parser name as SGLang and LMDeploy "
            "name them (qwen, hermes, llama3, internlm, deepseekv3, ...), auto (from the chat template) or null (none)"
        ),
    )
    reasoning_parser: str | None = Field(
        default=None,
        description="splits <think> reasoning into reasoning_content: deepseek-r1, qwen3, qwen3-thinking; null: none",
    )
    routing: Literal["session", "prefix", "least_loaded"] = Field(
        default="session",
        description=(
            "how requests pick a replica: session (a session id's requests stay on one replica: agent runs, "
            "x-session-id, the OpenAI user field; others spread evenly), prefix (requests whose prompts share a "
            "prefix go to the replica that served it, unless it is busier), least_loaded (power of two choices)"
        ),
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v.startswith(AGENT_MODEL_PREFIX):
            raise ValueError(f"model names may not start with {AGENT_MODEL_PREFIX!r}: that prefix addresses agents")
        return _check_name(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _pools_or_single(self) -> "ModelSpec":
        if self.pools:
            both = sorted(self.model_fields_set & (set(ServingSpec.model_fields) | {"replicas"}))
            if both:
                raise ValueError(
                    f"with pools, set {', '.join(both)} per pool, not on the model (each pool has its own engine, accelerator and replicas)"
                )
            names = [p.name for p in self.pools]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"pool names must be unique within a model; repeated: {', '.join(dupes)}")
        return self


class OwnModelSpec(ServingSpec):
    """A model an agent replica hosts itself (an SGLang agent replica with its own GPU)."""

    source: str


class AgentSpec(_Strict):
    name: str
    program: str = Field(description="import path of an @sgl.function, module:function")
    model: str | None = Field(default=None, description="the base model its gen/select calls go to (over handles)")
    own_model: OwnModelSpec | None = Field(
        default=None, description="instead of model: an engine inside each agent replica serving its programs"
    )
    replicas: ReplicaSpec = ReplicaSpec()
    cpus: PositiveFloat = Field(default=0.1, description="CPUs per agent replica; programs mostly wait on the model")
    max_calls: PositiveInt = Field(default=64, description="generation calls allowed per program run")
    timeout_s: PositiveFloat = Field(default=120.0, description="wall-clock limit per program run")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, slash=False)

    @model_validator(mode="after")
    def _one_backend(self) -> "AgentSpec":
        if (self.model is None) == (self.own_model is None):
            raise ValueError("give exactly one of model (a base model of this config) or own_model (an engine in the agent replica)")
        return self

    @field_validator("program")
    @classmethod
    def _program(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            raise ValueError("must be an import path of the form 'package.module:function'")
        return v


class GatewaySpec(_Strict):
    api_keys_env: str | None = Field(
        default=None, description="name of an env var holding comma-separated API keys; unset: no auth"
    )
    keys_file: str | None = Field(
        default=None,
        description="YAML/JSON file of tenants: per key (stored as its SHA-256) the models and agents it may use, "
        "its request / token / concurrency limits and admin rights; re-read when it changes (python -m cluster hash-key)",
    )
    cpus: PositiveFloat = 0.25
    replicas: PositiveInt = 1
    # The gateway only waits on I/O: Serve's default of 5 requests per replica would queue clients.
    max_ongoing_requests: PositiveInt = 1024
    max_concurrent_requests: PositiveInt = Field(
        default=768,
        description="requests (streams until they end) one gateway replica serves at once; beyond it, 429 with Retry-After at once",
    )
    max_request_bytes: PositiveInt | None = Field(
        default=32 * 1024 * 1024, description="request bodies over this many bytes get 413 before they are read; null: no bound"
    )
    request_timeout_s: PositiveFloat = 600.0
    drain_timeout_s: PositiveFloat = Field(
        default=120.0,
        description="a gateway replica being replaced (serve deploy) or stopped lets its in-flight requests and streams finish for up to this long",
    )
    sglang_model: str | None = Field(default=None, description="the model behind SGLang's native API; default: the first model")

    @model_validator(mode="after")
    def _own_bound_first(self) -> "GatewaySpec":
        # Past Serve's max_ongoing_requests the proxy queues requests (and answers 503 without
        # OpenAI's error shape); the gateway's own bound must trip first.
        if self.max_concurrent_requests > self.max_ongoing_requests:
            raise ValueError(
                f"max_concurrent_requests ({self.max_concurrent_requests}) must be <= max_ongoing_requests ({self.max_ongoing_requests})"
            )
        return self


class TandemConfig(_Strict):
    models: list[ModelSpec] = Field(min_length=1)
    agents: list[AgentSpec] = Field(default_factory=list)
    gateway: GatewaySpec = GatewaySpec()

    @field_validator("models", "agents")
    @classmethod
    def _unique_names(cls, specs: list, info) -> list:
        names = [spec.name for spec in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            kind = "model" if info.field_name == "models" else "agent"
            raise ValueError(f"{kind} names must be unique; repeated: {', '.join(dupes)}")
        return specs

    @model_validator(mode="after")
    def _references(self) -> "TandemConfig":
        names = [m.name for m in self.models]
        for a in self.agents:
            if a.model is not None and a.model not in names:
                raise ValueError(f"agent {a.name!r} uses model {a.model!r}, which is not a model of this config; models: {', '.join(names)}")
        if self.gateway.sglang_model is not None and self.gateway.sglang_model not in names:
            raise ValueError(f"gateway.sglang_model {self.gateway.sglang_model!r} is not a model of this config; models: {', '.join(names)}")
        return self

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)


def format_pydantic_error(err: dict, root: str) -> str:
    loc = root
    for part in err["loc"]:
        sep = "." if loc and not loc.endswith(".") else ""
        loc += f"[{part}]" if isinstance(part, int) else f"{sep}{part}"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field (value {err['input']!r}); check the spelling against the configuration reference"
    loc = loc.rstrip(".") or "args"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    got = repr(err["input"])
    if isinstance(err["input"], (dict, list)) or len(got) > 80:
        return f"{loc}: {msg}"  # the message already quotes the offending values
    return f"{loc}: {msg} (got {got})"


def validate_args(args: dict[str, Any] | None, root: str = "") -> TandemConfig:
    """The schema checks of the application `args`; raise ConfigError naming every bad field."""
    try:
        return TandemConfig.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError([format_pydantic_error(err, root) for err in e.errors()]) from None
