"""Per-run working directories: fresh and empty for every run, recycled instead of deleted.

Why recycle: on ext4 a directory owns a data block, so every mkdir allocates one and every rmdir
frees it again — with journaling, and on disks mounted with ``discard`` a synchronous TRIM that
parks the event loop (~50 µs per rmdir measured on the benchmark VM). For a short script that was
~130 µs of the worker's CPU per run, more than the script's whole log. A directory the script
left empty is therefore renamed to a hidden spare (``.aqsh-spare-…``) and renamed again into the
next run's fresh name; renames within one directory allocate and free nothing.

What the next run gets is indistinguishable from a new directory in what a script can observe
through its own files: a new name with its task id, no entries, mode 0700, owned by the worker.
A directory is only recycled when it is empty after the result file is removed and its mode and
owner are unchanged; anything else is deleted as before. It is checked empty again when handed
out. One thing differs from deleting: a process that escaped the task's process group (it called
setsid(), which the runner documents as out of reach) keeps the directory as its current
directory, so it could later write into a run that reuses it, where it would have hit a deleted
directory before. Scripts share a user, so tasks were never isolated from each other's
directories; this only removes an accident-stopper for such escaped processes.

Spares left by a worker that stopped (or crashed) are removed by the next worker that starts on
the same root; spares of a live worker are left alone (the pid is in the name).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat

import structlog

log = structlog.get_logger("aqsh.runner")

SPARE_PREFIX = ".aqsh-spare-"
MAX_SPARES = 256
_MODE = 0o700


class WorkDirs:
    def __init__(self, root: str, *, keep: bool = False, max_spares: int = MAX_SPARES) -> None:
        """``keep``: leave every directory in place after its run (nothing is recycled)."""
        self.root = root
        self.keep = keep
        self.max_spares = max_spares
        self._spares: list[str] = []
        self._ready = False
        self._pid = os.getpid()
        # Names are unique per worker by the counter and across workers sharing the root by the
        # random token; rename() would silently replace an empty directory of the same name.
        self._token = os.urandom(4).hex()
        self._counter = 0
        self._uid = os.geteuid()

    def create(self, task_id: str) -> str:
        if not self._ready:
            os.makedirs(self.root, exist_ok=True)
            self._sweep()
            self._ready = True
        while True:
            self._counter += 1
            path = os.path.join(self.root, f"aqsh-{task_id[:36]}-{self._token}{self._counter:x}")
            while self._spares:
                spare = self._spares.pop()
                try:
                    os.rename(spare, path)
                except OSError:
                    continue  # removed behind our back: take the next one
                if not os.listdir(path):
                    return path
                log.warning("workdir.spare_not_empty", path=path)
                shutil.rmtree(path, ignore_errors=True)
            try:
                os.mkdir(path, _MODE)
            except FileExistsError:
                continue
            return path

    async def release(self, work_dir: str, result_file: str) -> None:
        """After the run: recycle the directory if the script left it as it got it, else delete
        it (a small tree inline, anything bigger in a thread so the event loop never stalls)."""
        if self.keep:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(result_file)
        try:
            if len(self._spares) < self.max_spares and self._recyclable(work_dir):
                spare = os.path.join(self.root, f"{SPARE_PREFIX}{self._pid}-{self._token}"
                                                f"{self._counter:x}")
                self._counter += 1
                os.rename(work_dir, spare)
                self._spares.append(spare)
                return
            os.rmdir(work_dir)
        except OSError:
            await asyncio.to_thread(shutil.rmtree, work_dir, True)

    def _recyclable(self, work_dir: str) -> bool:
        st = os.lstat(work_dir)
        return (stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == _MODE
                and st.st_uid == self._uid and not os.listdir(work_dir))

    def _sweep(self) -> None:
        """Remove spares whose worker is gone (or is an earlier life of this pid)."""
        try:
            names = [n for n in os.listdir(self.root) if n.startswith(SPARE_PREFIX)]
        except OSError:
            return
        for name in names:
            pid_text = name[len(SPARE_PREFIX):].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != self._pid and _alive(int(pid_text)):
                continue
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
