"""Shared pieces of the benchmarks: a private Redis, the Go baseline binary, the machine record,
interleaved repetitions with min / median / max, and the one JSON line each benchmark ends with.

Why interleaved and repeated: on a small shared VM one run of one side says more about what
else the machine was doing at that moment (and about which core Redis landed on) than about the
code. Every side runs ``rounds`` times, the sides alternating A B A B …, and figures are the
median of each side with its min and max; ratios are ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The least repetitions of each side a benchmark accepts (issue 15: medians of at least 5).
MIN_ROUNDS = 5


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
    return json.loads(out.stdout.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return ordered[index]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def redis_version() -> str:
    from aqsh.redis_process import find_redis_server, server_version

    try:
        return ".".join(map(str, server_version(find_redis_server())))
    except Exception as exc:  # a record, not a check
        return f"unknown ({exc})"


def machine() -> dict[str, Any]:
    """What a reader needs to compare figures across machines."""
    return {
        "nproc": os.cpu_count() or 0,
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "redis": redis_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def affinity(pid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def placement(redis_pid: int, pinned_core: int | None) -> dict[str, Any]:
    """Where Redis ran: its allowed cores, whether the benchmark pinned it, and the core it was
    last seen on (field 39 of /proc/PID/stat) — the fast lane's spin-or-park choice and every
    sequential round trip depend on whether it shares a core with its caller."""
    last_core = -1
    try:
        fields = Path(f"/proc/{redis_pid}/stat").read_text().rsplit(")", 1)[1].split()
        last_core = int(fields[36])
    except (OSError, IndexError, ValueError):
        pass
    return {"redis_pinned_core": -1 if pinned_core is None else pinned_core,
            "redis_allowed_cores": affinity(redis_pid), "redis_last_core": last_core}


def redis_pid(process: Any) -> int:
    """The pid of a running ``RedisProcess`` (it keeps its Popen private)."""
    proc = process._proc
    assert proc is not None, "Redis is not running"
    return int(proc.pid)


def pin(pid: int, core: int) -> None:
    """Pin a running process to one core with ``taskset`` (what a reader would type), falling
    back to sched_setaffinity when taskset is missing."""
    if shutil.which("taskset"):
        subprocess.run(["taskset", "-pc", str(core), str(pid)], check=True,
                       stdout=subprocess.DEVNULL)
    else:
        os.sched_setaffinity(pid, {core})


def ensure_wrk() -> str:
    """The HTTP load generator: ``wrk`` (C, epoll). Installed from the distribution when
    missing and apt is usable; a Python client on the same two cores would measure itself."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit("wrk is needed for the HTTP benchmarks: apt-get install -y wrk (Debian/Ubuntu), "
             "brew install wrk, or build it from https://github.com/wg/wrk")


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


class Samples:
    """Repeated measurements per named side; printed as min / median / max as they come."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> float:
        self.values.setdefault(name, []).append(value)
        print(f"#   {name}: {value:,.2f}", file=sys.stderr, flush=True)
        return value

    async def measure(self, name: str, phase: Callable[[], Awaitable[float]]) -> float:
        return self.add(name, await phase())

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def ratio(self, a: str, b: str) -> float:
        """Ratio of medians: a ÷ b."""
        return self.median(a) / self.median(b)

    def table(self) -> str:
        width = max((len(n) for n in self.values), default=10)
        lines = [f"{'figure':<{width}}  {'min':>12} {'median':>12} {'max':>12}  n"]
        for name, values in self.values.items():
            s = spread(values)
            lines.append(f"{name:<{width}}  {s['min']:>12,.2f} {s['median']:>12,.2f} "
                         f"{s['max']:>12,.2f}  {len(values)}")
        return "\n".join(lines)

    def figures(self, digits: int = 3) -> dict[str, Any]:
        """``name`` = median, ``name_min`` / ``name_max`` = the spread."""
        out: dict[str, Any] = {}
        for name, values in self.values.items():
            s = spread(values)
            out[name] = round(s["median"], digits)
            out[f"{name}_min"] = round(s["min"], digits)
            out[f"{name}_max"] = round(s["max"], digits)
        return out


def report(name: str, figures: dict[str, Any], samples: Samples | None = None) -> None:
    """The last lines a benchmark prints: the human table (min / median / max per side), then
    one JSON object with the machine record, the figures and ``*_ratio`` fields."""
    if samples is not None:
        print(samples.table(), flush=True)
    ratios = {k: v for k, v in figures.items() if k.endswith("_ratio")}
    for key, value in sorted(ratios.items()):
        print(f"{key}: {value}", flush=True)
    print(json.dumps({"benchmark": name, "machine": machine(),
                      **(samples.figures() if samples else {}), **figures}, sort_keys=True))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
