"""The Tandem application config: the `args` of the application in a Ray Serve config file.

Every field is validated here, before Ray starts anything. A bad value raises `ConfigError`, whose
message names the field's path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
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
        default=300.0, description="with min 0: how long a request waits for the first replica before a 503"
    )
    drain_timeout_s: PositiveFloat = Field(
        default=120.0, description="a replica being scaled down finishes its in-flight requests for up to this long"
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

    engine: Literal["transformers", "turbomind", "lmdeploy-pytorch", "sglang", "auto"] = "auto"
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
    pools: list[PoolSpec] = Field(default_factory=list, description="several pools for this one model name")

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
    cpus: PositiveFloat = 0.25
    replicas: PositiveInt = 1
    # The gateway only waits on I/O: Serve's default of 5 requests per replica would queue clients.
    max_ongoing_requests: PositiveInt = 1024
    request_timeout_s: PositiveFloat = 600.0
    sglang_model: str | None = Field(default=None, description="the model behind SGLang's native API; default: the first model")


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


def _format_pydantic_error(err: dict, root: str) -> str:
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


@dataclass(frozen=True)
class ServingPlan:
    """A ServingSpec with everything resolved: the engine `auto` picked, the runtime_env it gets."""

    spec: ServingSpec
    source: str

    @cached_property
    def hf_config(self) -> dict | None:
        from deployments.builtin_models import read_model_config

        return read_model_config(self.source)

    @cached_property
    def engine(self) -> str:
        return resolve_engine(self.spec, self.hf_config, self.source)

    @property
    def auto(self) -> bool:
        return self.spec.engine == "auto"

    @property
    def accelerator(self) -> AcceleratorSpec:
        return self.spec.accelerator

    @property
    def engine_args(self) -> dict[str, Any]:
        return dict(self.spec.engine_args)

    @property
    def runtime_env(self) -> dict[str, Any]:
        from deployments.engine_registry import ENGINES

        if self.spec.runtime_env is not None:
            return dict(self.spec.runtime_env)
        return dict(ENGINES[self.engine].default_runtime_env)


@dataclass(frozen=True, kw_only=True)
class PoolPlan(ServingPlan):
    """One base-model deployment: a model, or one pool of a model with pools."""

    model: str
    replicas: ReplicaSpec
    stream_interval_ms: float
    pool: str | None = None  # None: the model has no pools

    @property
    def deployment_name(self) -> str:
        # Serve deployment names are also metric tags and log file names: keep them plain.
        name = self.model if self.pool is None else f"{self.model}-{self.pool}"
        return "BaseModel-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def model_pools(m: ModelSpec) -> list[PoolPlan]:
    if not m.pools:
        return [PoolPlan(spec=m, source=m.source, model=m.name, replicas=m.replicas, stream_interval_ms=m.stream_interval_ms)]
    return [
        PoolPlan(spec=p, source=p.source or m.source, model=m.name, pool=p.name, replicas=p.replicas,
                 stream_interval_ms=m.stream_interval_ms)
        for p in m.pools
    ]


def agent_own_model(a: AgentSpec) -> ServingPlan | None:
    return None if a.own_model is None else ServingPlan(spec=a.own_model, source=a.own_model.source)


def resolve_engine(spec: ServingSpec, hf_config: dict | None, source: str) -> str:
    """`auto`: GPU -> TurboMind when it supports the architecture, else SGLang; NPU -> LMDeploy's
    PyTorch engine; CPU -> transformers. Raises ValueError when GPU needs an unknown architecture."""
    if spec.engine != "auto":
        return spec.engine
    kind = spec.accelerator.kind
    if kind == "cpu":
        return "transformers"
    if kind == "npu":
        return "lmdeploy-pytorch"
    if isinstance(spec, OwnModelSpec):
        return "sglang"  # an agent replica's own engine is an SGLang runtime
    architectures = (hf_config or {}).get("architectures") or []
    if not architectures:
        raise ValueError(
            f"'auto' on a GPU picks TurboMind or SGLang by the model's architecture, but the config.json of "
            f"{source!r} is not on this machine; set engine: turbomind or engine: sglang"
        )
    import importlib.util

    if importlib.util.find_spec("lmdeploy") is None:
        raise ValueError(
            "'auto' on a GPU asks lmdeploy which architectures TurboMind supports, and lmdeploy is not installed "
            "here (pip install --no-deps lmdeploy==0.18.0); or set engine: turbomind or engine: sglang"
        )
    from deployments.lmdeploy_engine import turbomind_supports

    return "turbomind" if turbomind_supports(architectures[0]) else "sglang"


def _serving_problems(plan: ServingPlan, path: str) -> list[str]:
    """Engine vs accelerator, `auto` resolution, and engine_args against the engine's own config class."""
    from deployments.engine_registry import ENGINES, engine_args_checker

    try:
        engine = plan.engine
    except ValueError as e:
        return [f"{path}.engine: {e}"]
    shown = f"'auto' (resolved to {engine!r})" if plan.auto else repr(engine)
    kind = plan.accelerator.kind
    if kind not in ENGINES[engine].accelerators:
        allowed = [name for name, info in ENGINES.items() if kind in info.accelerators]
        return [
            f"{path}.engine: {shown} runs on {' or '.join(ENGINES[engine].accelerators)}, not on accelerator kind "
            f"{kind!r}; engines for {kind!r}: {', '.join(allowed)} (or 'auto')"
        ]
    checker = engine_args_checker(engine)
    if checker is not None:
        try:
            checker(plan.engine_args, plan.accelerator.count, plan.hf_config)
        except ValueError as e:
            return [f"{path}: engine {engine!r}: {e}"]
    return []


def _semantic_problems(cfg: TandemConfig, root: str) -> list[str]:
    """Checks that need the whole config, the model's config.json or the engine libraries."""
    from placement.resources import placement_problems

    problems = []
    for i, m in enumerate(cfg.models):
        for j, plan in enumerate(model_pools(m)):
            path = f"{root}models[{i}]" + (f".pools[{j}]" if m.pools else "")
            problems += _serving_problems(plan, path)
            problems += placement_problems(plan.accelerator, plan.replicas, f"{path}.accelerator", f"{path}.replicas")
    for i, a in enumerate(cfg.agents):
        problem = _program_problem(a.program)
        if problem:
            problems.append(f"{root}agents[{i}].program: {a.program!r} {problem}")
        own = agent_own_model(a)
        if own is not None:
            path = f"{root}agents[{i}]"
            problems += _serving_problems(own, f"{path}.own_model")
            problems += placement_problems(own.accelerator, a.replicas, f"{path}.own_model.accelerator", f"{path}.replicas")
    return problems


def _program_problem(path: str) -> str | None:
    """Programs are imported at check time, so a typo fails before Ray starts, not in a replica."""
    import importlib

    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        return f"cannot be imported: {type(e).__name__}: {e}"
    program = getattr(module, attr, None)
    if program is None:
        return f"not found: module {module_name!r} has no attribute {attr!r}"
    from sglang.lang.ir import SglFunction

    if not isinstance(program, SglFunction):
        return f"is a {type(program).__name__}, not an @sgl.function program"
    return None


def parse_args(args: dict[str, Any] | None, root: str = "") -> TandemConfig:
    """Validate the application `args`; raise ConfigError naming every bad field."""
    try:
        cfg = TandemConfig.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError([_format_pydantic_error(err, root) for err in e.errors()]) from None
    problems = _semantic_problems(cfg, root)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_serve_config(path: str | Path) -> list[tuple[dict, TandemConfig]]:
    """Read a Ray Serve config file and validate every Tandem application in it.

    Returns (application entry, parsed args) pairs. Applications built by something other than
    Tandem's builder are left to Ray Serve.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list):
        raise ConfigError([f"{path}: expected a Ray Serve config with an 'applications' list"])

    # The Serve-level schema (application names, route prefixes, ...) is Ray's own; validate with it.
    from ray.serve.schema import ServeDeploySchema

    problems: list[str] = []
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        problems += [_format_pydantic_error(err, "") for err in e.errors()]

    found = []
    for i, app in enumerate(doc["applications"]):
        if not isinstance(app, dict) or app.get("import_path") != APP_BUILDER:
            continue
        try:
            found.append((app, parse_args(app.get("args"), root=f"applications[{i}].args.")))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    if not found:
        raise ConfigError([f"{path}: no application with import_path {APP_BUILDER!r}"])
    return found
