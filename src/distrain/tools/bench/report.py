"""The benchmark's table (terminal, Markdown-friendly) and chart (PNG)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    name: str
    value: float  # a ratio (or a count); the figure that matters
    target: str
    passed: bool | None  # None: context only, no target
    detail: str  # absolute times, for context
    counted: bool = False  # a count, not a timing: judged in quick sizes too ("==" targets are)

    def as_dict(self) -> dict:
        return asdict(self)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], scale: float = 1.0) -> str:
    """'median (min-max)' in the given unit."""
    return f"{median(values) * scale:.2f} ({min(values) * scale:.2f}-{max(values) * scale:.2f})"


def unjudged_when_quick(row: Row) -> Row:
    """Quick sizes time nothing worth a verdict: keep counts' verdicts, drop timings'."""
    if row.passed is None or row.counted or row.target.startswith("=="):
        return row
    return Row(row.name, row.value, row.target, None,
               (row.detail + "; " if row.detail else "") + "quick sizes: not judged", row.counted)


def _verdict(row: Row) -> str:
    return "" if row.passed is None else ("ok" if row.passed else "MISSED")


def write_table(rows: list[Row], machine: dict) -> str:
    lines = [f"distrain bench on {machine['host']}: {machine['cpus']} CPUs, {machine['device']}, "
             f"torch {machine['versions']['torch']}, horovod {machine['versions']['horovod']}, "
             f"load {machine['load_average'][0]:.1f}, {machine['date']}",
             "| benchmark | value | target | | context |", "|---|---:|---|---|---|"]
    for row in rows:
        value = "n/a" if math.isnan(row.value) else f"{row.value:.3f}"
        lines.append(f"| {row.name} | {value} | {row.target} | {_verdict(row)} | {row.detail} |")
    return "\n".join(lines)


def write_chart(rows: list[Row], path: Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if not math.isnan(r.value)]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(shown) + 1.6))
    colors = ["#888888" if r.passed is None else ("#2a7" if r.passed else "#d33") for r in shown]
    ax.barh(range(len(shown)), [r.value for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), [r.name for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, r in enumerate(shown):
        ax.text(r.value, i, f" {r.value:.3f}  ({r.target})", va="center", fontsize=8)
    ax.set_xlabel("ratio (green: target met, red: missed, grey: context)")
    ax.set_title(f"distrain bench: {machine['cpus']} CPUs, {machine['device']}, "
                 f"{machine['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
