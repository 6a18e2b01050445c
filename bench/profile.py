"""Profiles of the processes under test (`python -m bench.run --profile`).

py-spy attaches to a pipeline process for its measured phase only and writes
collapsed stacks (`<name>.folded`, the input of flamegraph.pl and speedscope);
`summary()` turns them into the functions that take the most time, by own
time and by time including callees. Sampling does not pause the process
(--nonblocking), but it takes CPU on the same machine: the figures of a
profiled run are not comparable with an unprofiled one.

Only the thread holding the GIL is sampled (--gil), so the profile is where
Python spends its CPU. Without it, py-spy samples wall time minus what it
takes for idle, and on a machine as full as the latency figure's, a process
that wakes another with a socket write often loses its core inside the write:
such profiles put 18-20% of the worker's, the callbacks service's and the
ingress's samples in `_SelectorSocketTransport.write`, where the GIL-holder
samples of the same load put under 1% and the kernel's counters (/proc/stat)
about a tenth of the busy CPU in the kernel altogether (2026-11-27). Time a
C extension spends with the GIL released (RocksDB, chDB) is not sampled.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path

RATE = 200  # samples per second
ROOT = Path(__file__).resolve().parent.parent
_LINE = re.compile(r" \((.*):\d+\)$")


def py_spy() -> str:
    """The py-spy next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def command(pid: int, out: Path, seconds: float | None = None) -> list[str]:
    argv = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE),
        "--nonblocking",
        "--gil",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    if seconds is not None:
        argv += ["--duration", str(max(1, round(seconds)))]
    return argv


def _function(frame: str) -> str:
    """'handler (/x/site-packages/aiohttp/web.py:12)' -> 'handler (aiohttp/web.py)'."""
    match = _LINE.search(frame)
    if not match:
        return frame
    path = match.group(1)
    for marker in ("site-packages/", "/lib/python3.11/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{frame[: match.start()]} ({path})"


def _package(name: str) -> str:
    path = name.rpartition(" (")[2].rstrip(")")
    return "python" if path.startswith("<") else path.split("/", 1)[0].removesuffix(".py")


# frames every sample passes through: they say nothing about where time goes
_PLUMBING = ("asyncio", "runpy", "threading", "selectors", "python")
_ENTRY = ("pipeline/__main__.py", "pipeline/cli.py", "pipeline/runtime.py", "mode/worker.py")


def summary(folded: Path, top: int = 15) -> str:
    """Own time by package and by function, and time including callees by
    function (event-loop and entry-point frames left out)."""
    own, total, packages, samples = Counter(), Counter(), Counter(), 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for name in set(frames):
            if _package(name) not in _PLUMBING and not name.endswith(_ENTRY_SUFFIXES):
                total[name] += n
    if not samples:
        return f"{folded.stem}: no samples\n"
    pct = lambda n: f"{100 * n / samples:5.1f}%"  # noqa: E731
    lines = [f"{folded.stem}: {samples} samples at {RATE}/s (GIL holder only: Python's CPU time)"]
    lines.append(
        "  own time by package: "
        + ", ".join(f"{name} {100 * n / samples:.0f}%" for name, n in packages.most_common(8))
    )
    lines.append("  own time:")
    lines += [f"    {pct(n)}  {name}" for name, n in own.most_common(top)]
    lines.append("  including callees:")
    lines += [f"    {pct(n)}  {name}" for name, n in total.most_common(top)]
    return "\n".join(lines) + "\n"


_ENTRY_SUFFIXES = tuple(f"({path})" for path in _ENTRY)
