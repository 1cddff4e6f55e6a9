"""The engine registry: one place that knows every engine adapter.

For each engine name used in config: where its adapter lives (imported lazily: each pulls a heavy
library), which accelerator kinds it runs on, the Ray `runtime_env` its replicas get unless the
config sets one, and the function that checks `engine_args` against the library's own config
class at `python -m cluster check` time (in the engine's `*_config` module, apart from its runtime).

Nothing here imports an engine library; this module is safe to import anywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from deployments.engines.engine import Engine


@dataclass(frozen=True)
class EngineInfo:
    name: str
    adapter: str  # "module:Class"; the class takes (model_path, engine_args, *, tokenizer, device_count)
    accelerators: tuple[str, ...]  # accelerator kinds it runs on
    library: str  # the Python package it needs (checked with importlib)
    # Ray runtime_env for its replicas when the config gives none. lmdeploy and sglang pin different
    # torch versions, so each gets its own environment; Ray builds it on each node, layered over the
    # node's own site-packages (where Tandem itself is installed).
    default_runtime_env: dict[str, Any] = field(default_factory=dict)
    checker: str | None = None  # "module:function"(engine_args, device_count, hf_config) -> None
    # "module:function"(hf_config) -> bool: whether the engine runs this model, asked by `engine: auto`
    # (None: every model). Raises ValueError when it cannot tell (no config.json, library missing).
    supports: str | None = None


ENGINES: dict[str, EngineInfo] = {
    "transformers": EngineInfo(
        name="transformers",
        adapter="deployments.engines.transformers_engine:TransformersEngine",
        accelerators=("cpu", "gpu"),
        library="transformers",
        checker="deployments.engines.transformers_config:check_engine_args",
    ),
    "turbomind": EngineInfo(
        name="turbomind",
        adapter="deployments.engines.lmdeploy_engine:TurbomindEngine",
        accelerators=("gpu",),
        library="lmdeploy",
        default_runtime_env={"pip": {"packages": ["lmdeploy==0.18.0"], "pip_check": False}},
        checker="deployments.engines.lmdeploy_config:check_turbomind_args",
        supports="deployments.engines.lmdeploy_config:turbomind_supports_model",
    ),
    "lmdeploy-pytorch": EngineInfo(
        name="lmdeploy-pytorch",
        adapter="deployments.engines.lmdeploy_engine:LMDeployPytorchEngine",
        accelerators=("npu",),
        library="lmdeploy",
        # Ascend images ship torch_npu and lmdeploy prepared for the CANN version on the node; a
        # pip list cannot build that, so the node's own environment is used unless config says otherwise.
        default_runtime_env={},
        checker="deployments.engines.lmdeploy_config:check_pytorch_args",
    ),
    "sglang": EngineInfo(
        name="sglang",
        adapter="deployments.engines.sglang_engine:SGLangEngine",
        accelerators=("gpu",),
        library="sglang",
        default_runtime_env={"pip": {"packages": ["sglang[all]==0.5.23"], "pip_check": False}},
        checker="deployments.engines.sglang_config:check_engine_args",
    ),
}


AUTO = "auto"
# `engine: auto`: per accelerator kind, the engines to try in order; the first whose `supports` hook
# accepts the model is used. An agent's own engine is always an SGLang runtime on GPUs.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("transformers",),
    "gpu": ("turbomind", "sglang"),
    "npu": ("lmdeploy-pytorch",),
}
AGENT_AUTO_ORDER: dict[str, tuple[str, ...]] = {**AUTO_ORDER, "gpu": ("sglang",)}


def engine_names() -> list[str]:
    """The names a config may give as `engine` (besides "auto")."""
    return list(ENGINES)


def pick_engine(kind: str, hf_config: dict | None, source: str, order: dict[str, tuple[str, ...]] = AUTO_ORDER) -> str:
    """The engine `auto` means for a model on accelerator `kind`. Raises ValueError when a hook cannot tell."""
    candidates = order[kind]
    for name in candidates[:-1]:
        info = ENGINES[name]
        if info.supports is None:
            return name
        if importlib.util.find_spec(info.library) is None:
            raise ValueError(
                f"'auto' on {kind!r} asks {info.library} whether {name} runs the model, and {info.library} is not "
                f"installed here; install it (see README: Engines) or set engine to one of {', '.join(candidates)}"
            )
        if _load(info.supports)(hf_config, source):
            return name
    return candidates[-1]


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def create_engine(name: str, model_path: str, engine_args: dict, tokenizer, device_count: int = 1) -> Engine:
    """Instantiate the adapter for `name` (not started yet)."""
    try:
        info = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
    return _load(info.adapter)(model_path, dict(engine_args), tokenizer=tokenizer, device_count=device_count)


def engine_args_checker(name: str):
    """The engine's check function, or None when its library is not installed here (the replica,
    in its own runtime_env, checks then). Raises nothing else."""
    info = ENGINES[name]
    if info.checker is None or importlib.util.find_spec(info.library) is None:
        return None
    return _load(info.checker)
