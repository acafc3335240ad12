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

Spares are removed when the runner closes (a graceful stop); those left by a worker that crashed
are removed by the next worker that starts on the same root; spares of a live worker are left
alone (the pid is in the name).

The root itself is private: created 0700, and refused (``check_work_root``) when it is a
symlink, someone else's, or writable by group or others — anyone who can write there could
swap a run's directory, or its result file, under the worker. Task ids come from any asynq
client, so they reach directory names only through ``safe_name``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat

import structlog

from aqsh.errors import ConfigError

log = structlog.get_logger("aqsh.runner")

SPARE_PREFIX = ".aqsh-spare-"
MAX_SPARES = 256
_MODE = 0o700
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: How much of the task id a directory name keeps: a UUID, whole.
ID_CHARS = 36


def safe_name(task_id: str) -> str:
    """The part of a task id that may go into a file name: letters, digits, ``_`` and ``-``
    (anything else — ``/``, ``..``, NUL, newlines — becomes ``_``), at most ``ID_CHARS``."""
    return _UNSAFE.sub("_", task_id[:ID_CHARS]) or "_"


def check_work_root(root: str) -> None:
    """Create the work root (0700) if it is missing; raise ConfigError with one line saying
    what is wrong if it is not a private directory of this user."""
    uid = os.geteuid()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, _MODE)
        st = os.lstat(root)
    except OSError as exc:
        raise ConfigError(f"work root {root!r} cannot be created: "
                          f"{exc.strerror or type(exc).__name__}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"work root {root!r} is a symbolic link; point AQSH_RESULTS_DIR at a "
                          f"real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"work root {root!r} is not a directory")
    if st.st_uid != uid:
        raise ConfigError(f"work root {root!r} belongs to uid {st.st_uid}, not to this worker "
                          f"(uid {uid}); it must be the worker's own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"work root {root!r} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); make it 0700")


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

    def check(self) -> None:
        """Check (or create) the root and sweep dead workers' spares; done before the first
        run, and at start-up by a worker so a bad root stops it with one clear line."""
        if not self._ready:
            check_work_root(self.root)
            self._sweep()
            self._ready = True

    def create(self, task_id: str) -> str:
        self.check()
        name = safe_name(task_id)
        while True:
            self._counter += 1
            path = os.path.join(self.root, f"aqsh-{name}-{self._token}{self._counter:x}")
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

    async def release(self, work_dir: str, result_file: str, *,
                      dir_fd: int | None = None) -> None:
        """After the run: recycle the directory if the script left it as it got it, else delete
        it (a small tree inline, anything bigger in a thread so the event loop never stalls).

        ``dir_fd``: the directory as opened before the run; the result file is removed through
        it, since the path may now lead elsewhere (a script can replace its directory with a
        symlink, and the worker must not delete files through that). A symlink found at the
        directory's path is removed itself, never followed."""
        if self.keep:
            return
        # One lstat serves both checks: removing the result file changes what the directory
        # holds, not what the path is, its mode or its owner.
        seen = _lstat(work_dir)
        if not _remove_result(work_dir, result_file, dir_fd,
                              seen is not None and stat.S_ISLNK(seen.st_mode)):
            return
        try:
            if len(self._spares) < self.max_spares and self._recyclable(work_dir, seen):
                spare = os.path.join(self.root, f"{SPARE_PREFIX}{self._pid}-{self._token}"
                                                f"{self._counter:x}")
                self._counter += 1
                os.rename(work_dir, spare)
                self._spares.append(spare)
                return
            os.rmdir(work_dir)
        except OSError:
            await asyncio.to_thread(shutil.rmtree, work_dir, True)

    def close(self) -> None:
        """Remove this worker's spares (a graceful stop leaves nothing behind)."""
        spares, self._spares = self._spares, []
        for spare in spares:
            with contextlib.suppress(OSError):
                os.rmdir(spare)  # spares are empty; anything else is not ours to delete

    def _recyclable(self, work_dir: str, seen: os.stat_result | None) -> bool:
        """``seen``: the path's lstat (None: it is gone)."""
        return (seen is not None and stat.S_ISDIR(seen.st_mode)
                and stat.S_IMODE(seen.st_mode) == _MODE and seen.st_uid == self._uid
                and not os.listdir(work_dir))

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


def _remove_result(work_dir: str, result_file: str, dir_fd: int | None, is_link: bool) -> bool:
    """Remove the result file; False (and the symlink removed) when ``work_dir`` is no longer
    a directory but a symlink the script put there (``is_link``)."""
    with contextlib.suppress(OSError):  # missing, or a directory the script made there
        if dir_fd is not None:
            os.unlink(os.path.basename(result_file), dir_fd=dir_fd)
        elif not is_link:
            os.unlink(result_file)
    if is_link:
        with contextlib.suppress(OSError):
            os.unlink(work_dir)
        return False
    return True


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
