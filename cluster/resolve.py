"""A validated config resolved against the engines, model files and placement: what each
deployment really runs (`auto` picked, runtime_env defaulted), and the checks that need more than the
schema. `parse_args` and `load_serve_config` are the entry points (`cluster/app.py`, the CLI).

Every problem raises `ConfigError` before Ray starts, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.config import (
    APP_BUILDER,
    AcceleratorSpec,
    AgentSpec,
    ConfigError,
    ModelSpec,
    OwnModelSpec,
    ReplicaSpec,
    ServingSpec,
    TandemConfig,
    format_pydantic_error,
    validate_args,
)
from cluster.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS
from cluster.tenants import load_keys_file
from deployments.engines import registry
from deployments.models.builtin import read_model_config
from placement.resources import placement_problems


@dataclass(frozen=True)
class ServingPlan:
    """A ServingSpec with everything resolved: the engine `auto` picked, the runtime_env it gets."""

    spec: ServingSpec
    source: str

    @cached_property
    def hf_config(self) -> dict | None:
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
        if self.spec.runtime_env is not None:
            return dict(self.spec.runtime_env)
        return dict(registry.ENGINES[self.engine].default_runtime_env)


@dataclass(frozen=True, kw_only=True)
class PoolPlan(ServingPlan):
    """One base-model deployment: a model, or one pool of a model with pools."""

    model: str
    replicas: ReplicaSpec
    stream_interval_ms: float
    stream_chunks_per_s: float
    routing: str = "session"  # the model's `routing:` (every pool routes alike)
    pool: str | None = None  # None: the model has no pools

    @property
    def deployment_name(self) -> str:
        # Serve deployment names are also metric tags and log file names: keep them plain.
        name = self.model if self.pool is None else f"{self.model}-{self.pool}"
        return "BaseModel-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def model_pools(m: ModelSpec) -> list[PoolPlan]:
    if not m.pools:
        return [PoolPlan(spec=m, source=m.source, model=m.name, replicas=m.replicas, stream_interval_ms=m.stream_interval_ms,
                         stream_chunks_per_s=m.stream_chunks_per_s, routing=m.routing)]
    return [
        PoolPlan(spec=p, source=p.source or m.source, model=m.name, pool=p.name, replicas=p.replicas,
                 stream_interval_ms=m.stream_interval_ms, stream_chunks_per_s=m.stream_chunks_per_s, routing=m.routing)
        for p in m.pools
    ]


def agent_own_model(a: AgentSpec) -> ServingPlan | None:
    return None if a.own_model is None else ServingPlan(spec=a.own_model, source=a.own_model.source)


def resolve_engine(spec: ServingSpec, hf_config: dict | None, source: str) -> str:
    """The engine a spec names, or the one `auto` picks (the registry's order and `supports` hooks).
    Raises ValueError for an unknown name, or when `auto` cannot tell."""
    if spec.engine != registry.AUTO:
        if spec.engine not in registry.ENGINES:
            raise ValueError(f"unknown engine {spec.engine!r}; allowed: {', '.join(registry.engine_names())}, auto")
        return spec.engine
    order = registry.AGENT_AUTO_ORDER if isinstance(spec, OwnModelSpec) else registry.AUTO_ORDER
    return registry.pick_engine(spec.accelerator.kind, hf_config, source, order)


def _serving_problems(plan: ServingPlan, path: str) -> list[str]:
    """Engine vs accelerator, `auto` resolution, and engine_args against the engine's own config class."""
    ENGINES = registry.ENGINES
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
    checker = registry.engine_args_checker(engine)
    if checker is not None:
        try:
            checker(plan.engine_args, plan.accelerator.count, plan.hf_config)
        except ValueError as e:
            return [f"{path}: engine {engine!r}: {e}"]
    return []


def _semantic_problems(cfg: TandemConfig, root: str) -> list[str]:
    """Checks that need the whole config, the model's config.json or the engine libraries."""
    problems = []
    for i, m in enumerate(cfg.models):
        problems += _parser_problems(m, f"{root}models[{i}]")
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
    if cfg.gateway.keys_file is not None:
        try:
            load_keys_file(cfg.gateway.keys_file)
        except ValueError as e:
            problems.append(f"{root}gateway.keys_file: {e}")
    return problems


def _parser_problems(m: ModelSpec, path: str) -> list[str]:
    """The output parsers are named in the config (a leaf that cannot import them): checked here."""
    problems = []
    if m.tool_call_parser not in (None, "auto") and m.tool_call_parser not in TOOL_CALL_PARSERS:
        problems.append(f"{path}.tool_call_parser: unknown parser {m.tool_call_parser!r}; allowed: "
                        f"{', '.join(sorted(TOOL_CALL_PARSERS))}, auto (from the chat template) or null")
    if m.reasoning_parser is not None and m.reasoning_parser not in REASONING_PARSERS:
        problems.append(f"{path}.reasoning_parser: unknown parser {m.reasoning_parser!r}; allowed: "
                        f"{', '.join(sorted(REASONING_PARSERS))} or null")
    return problems


def _program_problem(path: str) -> str | None:
    """Programs are imported at check time, so a typo fails before Ray starts, not in a replica."""
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
    cfg = validate_args(args, root)
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
        problems += [format_pydantic_error(err, "") for err in e.errors()]

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
