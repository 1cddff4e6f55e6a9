"""Generates Tandem's Grafana dashboard, `dashboards/tandem.json`, from the panels below.

    .venv/bin/python -m dashboards.build            # (re)write dashboards/tandem.json
    .venv/bin/python -m dashboards.build --check    # exit 1 if the file is not what this generates

The layout follows Ray's own dashboards (`ray/dashboard/modules/metrics/dashboards/`): a hidden-able
`datasource` variable that every panel and variable query goes through, a `Cluster` variable over
`ray_io_cluster` (set per cluster by KubeRay's PodMonitor; absent, it matches everything), an
`Application` variable over Serve's applications, rows of panels two to a row (12 x 8 each), rates
over 5 m. Panels are Grafana `timeseries` (Grafana >= 8; Ray's legacy `graph` panels need Angular,
which Grafana 11 turns off). The PromQL is written out in full, one string per query, so a reader
sees what each panel asks Prometheus; `tests/test_dashboard.py` checks every metric and label it
names against a live cluster's metrics endpoint.

Tandem's metrics are in `deployments/metrics.py` (`METRICS`); every one of them must be on a panel
(generation fails otherwise), and each panel's description repeats what its Tandem metrics mean.
Tandem's own metrics carry no `application` label (they are recorded with `ray.util.metrics`, not
Serve's): `Application` filters the Serve panels, `Model` / `Pool` / `Agent` the Tandem ones.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deployments.metrics import METRICS

OUTPUT = Path(__file__).resolve().with_name("tandem.json")
UID = "tandemDashboard"
TITLE = "Tandem"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11; older dashboards are migrated up on load, newer ones not down
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Grafana's grid is 24 wide; Ray's dashboards put two 12 x 8 panels side by side under 1-high rows.
PANEL_W, PANEL_H, ROW_H, GRID_W = 12, 8, 1, 24


@dataclass
class Target:
    expr: str
    legend: str


@dataclass
class Panel:
    id: int
    title: str
    description: str
    unit: str
    targets: list[Target]
    max: float | None = None
    stack: bool = False


@dataclass
class Row:
    id: int
    title: str
    panels: list[Panel] = field(default_factory=list)


# -- the panels ----------------------------------------------------------------------------------------

ROWS = [
    Row(100, "Models: requests, latency, tokens", [
        Panel(
            1, "Requests / s by status",
            "Finished generations per model and pool, by status (ok, invalid: a bad request, error, cancelled).",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_model_requests_total{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, status)',
                    "{{model}}/{{pool}} {{status}}",
                ),
            ],
            stack=True,
        ),
        Panel(
            2, "Errors / s by class",
            "Generations that raised, per model and pool, by exception class.",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_model_errors_total{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, error)',
                    "{{model}}/{{pool}} {{error}}",
                ),
            ],
            stack=True,
        ),
        Panel(
            3, "Time to first token (p50 / p90 / p99)",
            "Seconds from the call to the first delta, per model and pool.",
            "s",
            [
                Target(
                    'histogram_quantile(0.5, sum(rate(ray_tandem_model_time_to_first_token_seconds_bucket{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, le))',
                    "p50 {{model}}/{{pool}}",
                ),
                Target(
                    'histogram_quantile(0.9, sum(rate(ray_tandem_model_time_to_first_token_seconds_bucket{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, le))',
                    "p90 {{model}}/{{pool}}",
                ),
                Target(
                    'histogram_quantile(0.99, sum(rate(ray_tandem_model_time_to_first_token_seconds_bucket{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, le))',
                    "p99 {{model}}/{{pool}}",
                ),
            ],
        ),
        Panel(
            4, "Time per output token (p50 / p90 / p99)",
            "Mean seconds per output token after the first, one observation per generation, per model and pool.",
            "s",
            [
                Target(
                    'histogram_quantile(0.5, sum(rate(ray_tandem_model_time_per_output_token_seconds_bucket{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, le))',
                    "p50 {{model}}/{{pool}}",
                ),
                Target(
                    'histogram_quantile(0.9, sum(rate(ray_tandem_model_time_per_output_token_seconds_bucket{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, le))',
                    "p90 {{model}}/{{pool}}",
                ),
                Target(
                    'histogram_quantile(0.99, sum(rate(ray_tandem_model_time_per_output_token_seconds_bucket{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool, le))',
                    "p99 {{model}}/{{pool}}",
                ),
            ],
        ),
        Panel(
            5, "Tokens / s (finished generations)",
            "Generated and prompt tokens per second, per model and pool, counted when each generation finishes.",
            "short",
            [
                Target(
                    'sum(rate(ray_tandem_model_generation_tokens_total{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool)',
                    "generated {{model}}/{{pool}}",
                ),
                Target(
                    'sum(rate(ray_tandem_model_prompt_tokens_total{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}[5m])) by (model, pool)',
                    "prompt {{model}}/{{pool}}",
                ),
            ],
        ),
        Panel(
            6, "Engine tokens / s per replica",
            "Each replica's engine's recent generation rate (a gauge, refreshed every few seconds while the replica runs).",
            "short",
            [
                Target(
                    'sum(ray_tandem_engine_tokens_per_second{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}) by (model, pool, replica)',
                    "{{model}}/{{pool}} {{replica}}",
                ),
            ],
            stack=True,
        ),
    ]),
    Row(200, "Engines: queue and KV cache per replica", [
        Panel(
            7, "Requests waiting per replica",
            "Requests queued in each replica's engine, not yet in its running batch.",
            "short",
            [
                Target(
                    'sum(ray_tandem_engine_requests_waiting{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}) by (model, pool, replica)',
                    "{{model}}/{{pool}} {{replica}}",
                ),
            ],
        ),
        Panel(
            8, "Requests running per replica",
            "Requests in each replica's engine's running batch.",
            "short",
            [
                Target(
                    'sum(ray_tandem_engine_requests_running{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}) by (model, pool, replica)',
                    "{{model}}/{{pool}} {{replica}}",
                ),
            ],
        ),
        Panel(
            9, "KV cache usage per replica",
            "Fraction of each replica's KV cache in use.",
            "percentunit",
            [
                Target(
                    'max(ray_tandem_engine_kv_cache_usage{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}) by (model, pool, replica)',
                    "{{model}}/{{pool}} {{replica}}",
                ),
            ],
            max=1,
        ),
        Panel(
            20, "Prefix-cache hit rate per replica",
            "Share of the prompt tokens each replica's engine served from its prefix cache since it started "
            "(engines that can tell: transformers, SGLang). Compare routing: session / prefix / least_loaded.",
            "percentunit",
            [
                Target(
                    'sum(ray_tandem_engine_prefix_cache_hit_tokens{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}) by (model, pool, replica)'
                    ' / sum(ray_tandem_engine_prompt_tokens{model=~"$Model", pool=~"$Pool", ray_io_cluster=~"$Cluster"}) by (model, pool, replica)',
                    "{{model}}/{{pool}} {{replica}}",
                ),
            ],
            max=1,
        ),
    ]),
    Row(300, "Replicas (Serve)", [
        Panel(
            10, "Model replicas per pool: target vs healthy",
            "Serve's replica counts for each model deployment (BaseModel-<model>, BaseModel-<model>-<pool>): "
            "target is what the controller is bringing the deployment to, healthy what passes health checks, "
            "desired the autoscaling policy's raw decision before min/max bounds (autoscaled deployments only). "
            "Filtered by Application, not by Model / Pool (Serve tags deployments, not models).",
            "short",
            [
                Target(
                    'max(ray_serve_autoscaling_target_replicas{application=~"$Application", deployment=~"BaseModel-.+", ray_io_cluster=~"$Cluster"}) by (application, deployment)',
                    "target {{deployment}}",
                ),
                Target(
                    'sum(ray_serve_deployment_replica_healthy{application=~"$Application", deployment=~"BaseModel-.+", ray_io_cluster=~"$Cluster"}) by (application, deployment)',
                    "healthy {{deployment}}",
                ),
                Target(
                    'max(ray_serve_autoscaling_desired_replicas{application=~"$Application", deployment=~"BaseModel-.+", ray_io_cluster=~"$Cluster"}) by (application, deployment)',
                    "desired {{deployment}}",
                ),
            ],
        ),
        Panel(
            11, "Agent and gateway replicas: target vs healthy",
            "Serve's replica counts for every other deployment (Agent-<agent>, the gateway), as the panel beside.",
            "short",
            [
                Target(
                    'max(ray_serve_autoscaling_target_replicas{application=~"$Application", deployment!~"BaseModel-.+", ray_io_cluster=~"$Cluster"}) by (application, deployment)',
                    "target {{deployment}}",
                ),
                Target(
                    'sum(ray_serve_deployment_replica_healthy{application=~"$Application", deployment!~"BaseModel-.+", ray_io_cluster=~"$Cluster"}) by (application, deployment)',
                    "healthy {{deployment}}",
                ),
                Target(
                    'max(ray_serve_autoscaling_desired_replicas{application=~"$Application", deployment!~"BaseModel-.+", ray_io_cluster=~"$Cluster"}) by (application, deployment)',
                    "desired {{deployment}}",
                ),
            ],
        ),
        Panel(
            12, "Replica starts (5 m)",
            "Replicas started per deployment in the last 5 minutes (scale-ups, restarts after failures).",
            "short",
            [
                Target(
                    'sum(increase(ray_serve_deployment_replica_starts_total{application=~"$Application", ray_io_cluster=~"$Cluster"}[5m])) by (application, deployment)',
                    "{{deployment}}",
                ),
            ],
            stack=True,
        ),
    ]),
    Row(400, "Agents", [
        Panel(
            13, "Agent runs / s by status",
            "Finished agent runs by status (ok, invalid, limit, error, cancelled).",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_agent_runs_total{agent=~"$Agent", ray_io_cluster=~"$Cluster"}[5m])) by (agent, status)',
                    "{{agent}} {{status}}",
                ),
            ],
            stack=True,
        ),
        Panel(
            14, "Agent errors / s by class",
            "Agent runs that raised, by exception class.",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_agent_errors_total{agent=~"$Agent", ray_io_cluster=~"$Cluster"}[5m])) by (agent, error)',
                    "{{agent}} {{error}}",
                ),
            ],
            stack=True,
        ),
        Panel(
            15, "Agent run time (p50 / p90 / p99)",
            "Wall-clock seconds per agent run, all statuses.",
            "s",
            [
                Target(
                    'histogram_quantile(0.5, sum(rate(ray_tandem_agent_run_seconds_bucket{agent=~"$Agent", ray_io_cluster=~"$Cluster"}[5m])) by (agent, le))',
                    "p50 {{agent}}",
                ),
                Target(
                    'histogram_quantile(0.9, sum(rate(ray_tandem_agent_run_seconds_bucket{agent=~"$Agent", ray_io_cluster=~"$Cluster"}[5m])) by (agent, le))',
                    "p90 {{agent}}",
                ),
                Target(
                    'histogram_quantile(0.99, sum(rate(ray_tandem_agent_run_seconds_bucket{agent=~"$Agent", ray_io_cluster=~"$Cluster"}[5m])) by (agent, le))',
                    "p99 {{agent}}",
                ),
            ],
        ),
    ]),
    Row(500, "Gateway HTTP", [
        Panel(
            16, "HTTP requests / s by route",
            "Every gateway request by route template (unmatched: a 404 for an unknown path), method and status.",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_http_requests_total{ray_io_cluster=~"$Cluster"}[5m])) by (route, method, status)',
                    "{{method}} {{route}} {{status}}",
                ),
            ],
            stack=True,
        ),
        Panel(
            17, "HTTP errors / s by route",
            "Gateway requests answered with status >= 400, by route template and status (499: the client went away first).",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_http_errors_total{ray_io_cluster=~"$Cluster"}[5m])) by (route, status)',
                    "{{route}} {{status}}",
                ),
            ],
            stack=True,
        ),
    ]),
    Row(600, "Tenants", [
        Panel(
            18, "Requests / s by tenant",
            "Requests with a valid API key, by tenant (keys from api_keys_env: default) and status: ok, error, "
            "forbidden (a model or agent the key may not use, or an admin route), limited (over a rate limit: 429).",
            "reqps",
            [
                Target(
                    'sum(rate(ray_tandem_tenant_requests_total{ray_io_cluster=~"$Cluster"}[5m])) by (tenant, status)',
                    "{{tenant}} {{status}}",
                ),
            ],
            stack=True,
        ),
        Panel(
            19, "Tokens / s by tenant",
            "Prompt and completion tokens of each tenant's requests (what tokens_per_minute limits).",
            "short",
            [
                Target(
                    'sum(rate(ray_tandem_tenant_tokens_total{ray_io_cluster=~"$Cluster"}[5m])) by (tenant, kind)',
                    "{{tenant}} {{kind}}",
                ),
            ],
            stack=True,
        ),
    ]),
]


# -- template variables ----------------------------------------------------------------------------------


def _query_variable(name: str, label: str, query: str, description: str) -> dict:
    """A multi-value variable over one label's values, with All (`.*`, which also matches a series
    without the label), refreshed with the time range so new models / agents show up."""
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": DATASOURCE,
        "definition": query,
        "description": description,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


VARIABLES = [
    {
        "current": {},
        "description": "The Prometheus data source that scrapes the Ray nodes' metrics export ports.",
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "type": "datasource",
    },
    _query_variable(
        "Cluster", "Cluster",
        "label_values(ray_serve_deployment_replica_healthy, ray_io_cluster)",
        "The Ray cluster (ray_io_cluster, set by KubeRay's PodMonitor); All when Prometheus scrapes one cluster.",
    ),
    _query_variable(
        "Application", "Application",
        'label_values(ray_serve_deployment_replica_healthy{ray_io_cluster=~"$Cluster"}, application)',
        "Serve applications (filters the Serve replica panels).",
    ),
    _query_variable(
        "Model", "Model",
        'label_values(ray_tandem_engine_requests_running{ray_io_cluster=~"$Cluster"}, model)',
        "Tandem models (every running base-model replica reports its engine gauges).",
    ),
    _query_variable(
        "Pool", "Pool",
        'label_values(ray_tandem_engine_requests_running{model=~"$Model", ray_io_cluster=~"$Cluster"}, pool)',
        "Pools of the selected models (default: a model without pools).",
    ),
    _query_variable(
        "Agent", "Agent",
        'label_values(ray_tandem_agent_runs_total{ray_io_cluster=~"$Cluster"}, agent)',
        "Tandem agents that have finished a run.",
    ),
]


# -- rendering ----------------------------------------------------------------------------------------------

_TANDEM_NAME = re.compile(r"\bray_(tandem_[a-z0-9_]+)")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def tandem_metrics_of(panel: Panel) -> list[str]:
    """The `METRICS` entries a panel queries (a histogram by its `_bucket` / `_sum` / `_count`
    series); KeyError for a `ray_tandem_*` name that `deployments/metrics.py` does not define."""
    found: list[str] = []
    for target in panel.targets:
        for name in _TANDEM_NAME.findall(target.expr):
            if name not in METRICS:
                base = _HISTOGRAM_SUFFIX.sub("", name)
                if base == name or METRICS.get(base, ("",))[0] != "histogram":
                    raise KeyError(f"panel {panel.title!r} queries ray_{name}, which deployments/metrics.py does not define")
                name = base
            if name not in found:
                found.append(name)
    return found


def _description(panel: Panel) -> str:
    lines = [panel.description]
    lines += [f"ray_{name}: {METRICS[name][1]}" for name in tandem_metrics_of(panel)]
    return "\n".join(lines)


def _panel_json(panel: Panel, x: int, y: int) -> dict:
    defaults: dict = {
        "unit": panel.unit,
        "min": 0,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        },
    }
    if panel.max is not None:
        defaults["max"] = panel.max
    return {
        "datasource": DATASOURCE,
        "description": _description(panel),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "id": panel.id,
        "options": {
            "legend": {"calcs": ["mean", "lastNotNull", "max"], "displayMode": "table", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": target.expr,
                "legendFormat": target.legend,
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, target in enumerate(panel.targets)
        ],
        "title": panel.title,
        "type": "timeseries",
    }


def panels_json(rows: list[Row]) -> list[dict]:
    """Rows (expanded, so their panels sit at the top level, as Grafana keeps them) with two panels
    side by side."""
    out: list[dict] = []
    y = 0
    for row in rows:
        out.append({"collapsed": False, "gridPos": {"h": ROW_H, "w": GRID_W, "x": 0, "y": y}, "id": row.id, "panels": [], "title": row.title, "type": "row"})
        y += ROW_H
        for i, panel in enumerate(row.panels):
            out.append(_panel_json(panel, x=PANEL_W * (i % 2), y=y + PANEL_H * (i // 2)))
        y += PANEL_H * ((len(row.panels) + 1) // 2)
    return out


def dashboard(rows: list[Row] = ROWS) -> dict:
    shown = {name for row in rows for panel in row.panels for name in tandem_metrics_of(panel)}
    missing = sorted(set(METRICS) - shown)
    if missing:
        raise ValueError(f"metrics in deployments/metrics.py on no panel: {', '.join(missing)}")
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Tandem (Ray Serve LLM cluster): models, engines, replicas, agents, gateway. Generated by dashboards/build.py.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": panels_json(rows),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["tandem", "ray", "serve"],
        "templating": {"list": VARIABLES},
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": TITLE,
        "uid": UID,
        "version": 1,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run `python -m dashboards.build`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
