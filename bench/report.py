"""Figures and how they are reported: a JSON file and a markdown table.

A figure is a ratio of what the pipeline did to what a baseline did in the same
run on the same machine; both absolute measurements are kept beside it, so a
reader can tell a slow pipeline from a busy machine.
"""

from __future__ import annotations

import json
import operator
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

_COMPARE = {">=": operator.ge, "<=": operator.le}


@dataclass
class Figure:
    name: str
    goal: str  # ">= 0.7", "<= 1.5"
    value: float | None = None  # the ratio; None: not measured
    measured: str = ""  # the pipeline's absolute numbers, for people
    baseline: str = ""  # the baseline's absolute numbers, for people
    note: str = ""
    numbers: dict = field(default_factory=dict)  # everything measured, for machines

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        op, target = self.goal.split()
        return _COMPARE[op](self.value, float(target))


def not_measured(name: str, goal: str, why: str) -> Figure:
    return Figure(name, goal, note=f"not measured: {why}")


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def shown(value: float | None) -> str:
    if value is None:
        return "not measured"
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def markdown(figures: list[Figure], header: dict) -> str:
    lines = [
        f"Benchmark ({header['mode']}), {header['started']}, {header['machine']['cpus']} CPUs "
        f"({header['machine']['cpu']}), load generator: {header['load_generator']}",
        "",
        "| figure | value | goal | met | measured | baseline (same run) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        value = shown(f.value)
        met = {True: "yes", False: "**no**", None: "-"}[f.met]
        lines.append(
            f"| {f.name} | {value} | {f.goal} | {met} | {f.measured} | {f.baseline} | {f.note} |"
        )
    return "\n".join(lines) + "\n"


def write(figures: list[Figure], header: dict, out_dir: Path, stem: str = "latest") -> str:
    """Write <stem>.json and <stem>.md into `out_dir`; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        **header,
        "figures": [{**asdict(f), "met": f.met} for f in figures],
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(figures, header)
    (out_dir / f"{stem}.md").write_text(text)
    return text
