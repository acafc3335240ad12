"""`make bench`: every benchmark in turn; each prints its own JSON figures line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# chaos.py last: ~2 minutes, and it checks invariants (lost / stuck tasks) rather than speed;
# a failed drill fails the run.
BENCHMARKS = ["enqueue.py", "server.py", "scripts.py", "api.py", "webhooks.py", "held.py",
              "chaos.py"]

if __name__ == "__main__":
    failed = []
    for name in BENCHMARKS:
        path = HERE / name
        if not path.exists():
            print(f"# {name}: not present", flush=True)
            continue
        print(f"# {name}", flush=True)
        if subprocess.run([sys.executable, str(path)], check=False).returncode != 0:
            failed.append(name)
    sys.exit(1 if failed else 0)
