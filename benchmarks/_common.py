"""Shared pieces of the benchmarks: a private Redis, the Go baseline binary, figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def go_binary() -> str:
    """The Go baselines (real asynq v0.26.0); `make interop` or this function builds them."""
    path = ROOT / ".venv" / "bin" / "aqsh-interop"
    if not path.exists():
        subprocess.run(["go", "build", "-o", str(path), "./cmd/aqsh-interop"],
                       cwd=ROOT / "tests" / "interop", check=True)
    return str(path)


def go(command: str, redis_url: str, *flags: str) -> Any:
    out = subprocess.run([go_binary(), command, "-redis", redis_url, *flags], check=True,
                         capture_output=True, text=True, timeout=900)
    return json.loads(out.stdout)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return ordered[index]


def machine() -> str:
    cpus = os.cpu_count()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpus} cores ({model}), Python {sys.version.split()[0]}"


def report(name: str, figures: dict[str, Any]) -> None:
    """The last line a benchmark prints: one JSON object with figures and *_ratio fields."""
    print(json.dumps({"benchmark": name, "machine": machine(), **figures}, sort_keys=True))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
