"""The live tasks.yaml: loaded at start, reloaded on SIGHUP or when the file changes.

An invalid new file is rejected with an error logged and the previous configuration stays in
force, so a typo never takes the service down.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

from aqsh.clock import finish
from aqsh.errors import ConfigError
from aqsh.runner.spec import TasksConfig, load_tasks

log = structlog.get_logger("aqsh.config")


class ConfigHolder:
    def __init__(self, path: str, tasks_dir: str) -> None:
        self.path = path
        self.tasks_dir = tasks_dir
        self.current: TasksConfig = load_tasks(path, tasks_dir)
        self._mtime_ns = self._stat()
        self._watcher: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[TasksConfig], None]] = []

    def subscribe(self, listener: Callable[[TasksConfig], None]) -> None:
        """Call ``listener`` with every new configuration that takes effect (e.g. to re-sync
        the scheduler's entries)."""
        self._listeners.append(listener)

    def __call__(self) -> TasksConfig:
        return self.current

    def _stat(self) -> int:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return 0

    def reload(self) -> bool:
        """Returns True when a new configuration took effect."""
        self._mtime_ns = self._stat()
        try:
            config = load_tasks(self.path, self.tasks_dir)
        except ConfigError as exc:
            log.error("config.reload_rejected", path=self.path, error=exc.message)
            return False
        self.current = config
        log.info("config.reloaded", path=self.path, tasks=sorted(config.tasks))
        for listener in self._listeners:
            listener(config)
        return True

    def watch(self, interval_s: float = 2.0) -> None:
        """Poll the file's mtime; cheap, and works on every filesystem (ConfigMaps included)."""
        self._watcher = asyncio.create_task(self._watch(interval_s), name="aqsh-config-watch")

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._stat() != self._mtime_ns:
                self.reload()

    async def stop(self) -> None:
        if self._watcher is not None:
            await finish(self._watcher)
