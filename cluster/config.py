"""The Tandem application config: the `args` of the application in a Ray Serve config file.

Every field is validated here, before Ray starts anything. A bad value raises `ConfigError`, whose
message names the field's path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
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

ENGINES = ("transformers", "turbomind", "lmdeploy-pytorch", "sglang", "auto")
# Engines whose adapters ship in this version. The others are accepted by the schema so that a
# config written for a GPU cluster reads naturally, and rejected with a clear message below.
AVAILABLE_ENGINES = ("transformers",)
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


class ModelSpec(_Strict):
    name: str = Field(description='the OpenAI "model" id')
    source: str = Field(description="HF model dir | HF repo id | builtin:<name>")
    engine: Literal["transformers", "turbomind", "lmdeploy-pytorch", "sglang", "auto"] = "auto"
    accelerator: AcceleratorSpec = AcceleratorSpec()
    engine_args: dict[str, Any] = Field(default_factory=dict)
    replicas: ReplicaSpec = ReplicaSpec()
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    stream_interval_ms: float = Field(
        default=20.0, ge=0, le=1000,
        description="after the first token, stream deltas merged per this interval (0: one message per token)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v.startswith(AGENT_MODEL_PREFIX):
            raise ValueError(f"model names may not start with {AGENT_MODEL_PREFIX!r}: that prefix addresses agents")
        if not _NAME.match(v):
            raise ValueError("use letters, digits and . _ - / only, starting with a letter or digit")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @property
    def resolved_engine(self) -> str:
        """`auto` picks the engine for the accelerator kind."""
        if self.engine != "auto":
            return self.engine
        return {"cpu": "transformers", "gpu": "turbomind", "npu": "lmdeploy-pytorch"}[self.accelerator.kind]


class AgentSpec(_Strict):
    name: str
    program: str = Field(description="import path of an @sgl.function, module:function")
    model: str = Field(description="the base model its gen/select calls go to")
    replicas: ReplicaSpec = ReplicaSpec()
    cpus: PositiveFloat = Field(default=0.1, description="CPUs per agent replica; programs mostly wait on the model")
    max_calls: PositiveInt = Field(default=64, description="generation calls allowed per program run")
    timeout_s: PositiveFloat = Field(default=120.0, description="wall-clock limit per program run")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or "/" in v:
            raise ValueError("use letters, digits and . _ - only, starting with a letter or digit")
        return v

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
            if a.model not in names:
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


def _semantic_problems(cfg: TandemConfig, root: str) -> list[str]:
    """Checks that need the whole config or knowledge of what this version can run."""
    problems = []
    for i, m in enumerate(cfg.models):
        engine = m.resolved_engine
        if engine not in AVAILABLE_ENGINES:
            shown = f"'auto' (resolves to {engine!r} for accelerator kind {m.accelerator.kind!r})" if m.engine == "auto" else repr(engine)
            problems.append(
                f"{root}models[{i}].engine: {shown} is not available in this version of Tandem; "
                f"allowed: {', '.join(AVAILABLE_ENGINES)} (or 'auto' with accelerator kind 'cpu')"
            )
    for i, a in enumerate(cfg.agents):
        problem = _program_problem(a.program)
        if problem:
            problems.append(f"{root}agents[{i}].program: {a.program!r} {problem}")
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
