"""The performance goals, measured: a table and a PNG from the latest results of each benchmark.

    .venv/bin/python benchmarks/report.py          # from the latest JSON of each benchmark
    .venv/bin/python benchmarks/report.py --run    # run the four benchmarks first, one after the other

The goals (issue 14) and where each figure comes from:

| goal                                                   | benchmark                  |
|--------------------------------------------------------|----------------------------|
| tokens/s through the gateway / engine direct >= 0.8 at 1 and 8, >= 0.9 at 32 concurrent streams | gateway_vs_direct.py |
| compute-free engine: chunks/s through Tandem / bare Ray Serve app >= 0.8 | path_cost.py |
| 1-token chat completion p50 Tandem / bare Ray Serve app <= 1.2 | path_cost.py |
| agent program over RuntimeEndpoint / over handles (mean latency) >= 1.5 | agent_handles_vs_http.py |
| continuous batching / static generate tokens/s at 32 sequences >= 0.8 | cb_vs_static.py |

Each ratio is taken within one run of its benchmark (both sides measured side by side there).
Writes `benchmarks/results/report-<timestamp>.json` and `.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_results  # noqa: E402

# name -> the command line `--run` uses (the settings of the README's figures)
RUNS = {
    "gateway_vs_direct": ["benchmarks/gateway_vs_direct.py", "--requests-per-level", "8"],
    "path_cost": ["benchmarks/path_cost.py", "--levels", "1", "8", "32", "--streams-per-slot", "2", "--min-streams", "8",
                  "--latency-requests", "300"],
    "agent_handles_vs_http": ["benchmarks/agent_handles_vs_http.py", "--runs", "20"],
    "agent_handles_vs_http (1 token per call)": ["benchmarks/agent_handles_vs_http.py", "--runs", "30", "--max-tokens", "1"],
    "cb_vs_static": ["benchmarks/cb_vs_static.py", "--repeats", "4", "--modes", "static", "engine"],
}


def latest(name: str, where=lambda result: True) -> tuple[Path, dict] | None:
    """The newest result of benchmark `name` for which `where(result)` holds."""
    for path in sorted(RESULTS.glob(f"{name}-*.json"), reverse=True):
        result = json.loads(path.read_text())
        if where(result):
            return path, result
    return None


def rows() -> list[dict]:
    """One row per goal: what, measured ratio, goal, direction, source file."""
    out: list[dict] = []

    def add(what: str, value: float | None, goal: float, at_least: bool, source: Path | None):
        met = None if value is None else (value >= goal if at_least else value <= goal)
        out.append({"goal": what, "ratio": value, "target": goal, "at_least": at_least, "met": met,
                    "source": source.name if source else None})

    found = latest("gateway_vs_direct")
    for level, goal in (("1", 0.8), ("8", 0.8), ("32", 0.9)):
        value = None
        if found and level in found[1]["gateway"] and level in found[1]["direct"]:
            value = found[1]["gateway"][level]["tokens_per_s"] / found[1]["direct"][level]["tokens_per_s"]
        add(f"gateway / direct tokens/s, {level} streams", value, goal, True, found and found[0])

    found = latest("path_cost")
    ratios = found[1]["ratios"]["tandem0"] if found else {}
    for level in ("1", "8", "32"):
        add(f"null engine chunks/s Tandem / bare Serve, {level} streams", ratios.get("chunks_per_s", {}).get(level), 0.8, True,
            found and found[0])
    add("1-token latency p50 Tandem / bare Serve", ratios.get("one_token_p50"), 1.2, False, found and found[0])

    for tokens in (16, 1):
        found = latest("agent_handles_vs_http", lambda r, t=tokens: r["config"].get("max_tokens", 16) == t)
        value = None
        if found:
            r = found[1]["results"]
            value = r["outside_runtime_endpoint"]["mean_s"] / r["in_cluster_handles"]["mean_s"]
        add(f"agent program RuntimeEndpoint / handles latency, {tokens}-token calls", value, 1.5, True, found and found[0])

    found = latest("cb_vs_static")
    value = found[1]["results"].get("engine", {}).get("ratio_to_static") if found else None
    add("engine / static generate tokens/s, 32 sequences", value, 0.8, True, found and found[0])
    return out


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in table if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(shown) + 1.5))
    y = range(len(shown))
    colors = ["tab:green" if r["met"] else "tab:red" for r in shown]
    ax.barh(list(y), [r["ratio"] for r in shown], color=colors)
    for i, r in zip(y, shown):
        ax.plot([r["target"], r["target"]], [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(r["ratio"], i, f" {r['ratio']:.2f} ({'>=' if r['at_least'] else '<='} {r['target']:g})", va="center", fontsize=8)
    ax.set_yticks(list(y), [r["goal"] for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (black bar: the goal; green: met)")
    ax.set_title("Tandem's serving-path goals on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the four benchmarks first (about 10 minutes on 2 cores)")
    args = parser.parse_args()
    if args.run:
        for name, cmd in RUNS.items():
            print(f"[report] running {name} ...", flush=True)
            subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)

    table = rows()
    width = max(len(r["goal"]) for r in table)
    print(f"{'goal':<{width}} | {'ratio':>6} | {'target':>8} | met | from")
    print("-" * (width + 40))
    for r in table:
        value = "   -  " if r["ratio"] is None else f"{r['ratio']:6.2f}"
        target = f"{'>=' if r['at_least'] else '<='} {r['target']:g}"
        met = " - " if r["met"] is None else ("yes" if r["met"] else " no")
        print(f"{r['goal']:<{width}} | {value} | {target:>8} | {met} | {r['source'] or 'not run'}")
    out = write_results("report", {"goals": table})
    try:
        plot(table, out.with_suffix(".png"))
        print(f"\nwrote {out} and {out.with_suffix('.png').name}")
    except ImportError:
        print(f"\nwrote {out} (no PNG: pip install -e '.[bench]' for matplotlib)")


if __name__ == "__main__":
    main()
