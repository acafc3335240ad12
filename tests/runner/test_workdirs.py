"""Working directories are fresh for every run even though empty ones are recycled: a new name,
no entries, mode 0700; anything a script changed is deleted, not reused; spares of a stopped
worker are swept, and a stopping runner removes its own; the root is private or refused; task ids
are sanitised before they name a directory."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from aqsh.engine.keys import log_key
from aqsh.errors import ConfigError
from aqsh.runner.handler import RunnerSettings, ShellRunner
from aqsh.runner.spec import TasksConfig, TaskSpec
from aqsh.runner.workdirs import SPARE_PREFIX, WorkDirs, check_work_root, safe_name
from tests.runner.test_runner import Ctx, make_script, task


def spares(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith(SPARE_PREFIX))


async def lines(redis: aioredis.Redis, task_id: str) -> list[str]:
    return [f[b"line"].decode() for _, f in await redis.xrange(log_key(task_id)) if b"line" in f]


async def test_every_run_gets_an_empty_private_directory_under_its_own_name(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    look = TaskSpec(name="look", script=make_script(
        tmp_path, 'echo "$PWD"; ls -A; stat -c %a .\n', "look.sh"))
    litter = TaskSpec(name="litter", script=make_script(
        tmp_path, 'echo "$PWD"; echo secret > left-behind\n', "litter.sh"))
    root = tmp_path / "work"
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"look": look, "litter": litter}),
                         redis, RunnerSettings(work_root=str(root)))
    seen: list[str] = []
    for i, name in enumerate(["litter", "look", "look", "litter", "look"]):
        task_id = f"task-{i}"
        await runner(task(name, task_id=task_id), Ctx(task_id))
        out = await lines(redis, task_id)
        seen.append(out[0])
        assert os.path.basename(out[0]).startswith(f"aqsh-{task_id}-")
        if name == "look":
            assert out[1:] == ["700"]  # no entries: not the litter, not an earlier result
        assert not os.path.exists(out[0])
    assert len(set(seen)) == len(seen)
    assert len(spares(root)) == 1  # the looks left theirs empty: one spare serves them all


async def test_a_directory_the_script_changed_is_deleted_not_recycled(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    spec = TaskSpec(name="chmod", script=make_script(tmp_path, "chmod 755 .\n"))
    root = tmp_path / "work"
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"chmod": spec}), redis,
                         RunnerSettings(work_root=str(root)))
    await runner(task("chmod"), Ctx("t1"))
    assert os.listdir(root) == []


async def test_a_spare_written_to_while_idle_is_never_handed_out(tmp_path: Path) -> None:
    """A process that escaped its group may still sit in a recycled directory."""
    dirs = WorkDirs(str(tmp_path))
    first = dirs.create("a")
    await dirs.release(first, os.path.join(first, ".aqsh-result"))
    (spare,) = spares(tmp_path)
    (tmp_path / spare / "written-later").write_text("x")
    second = dirs.create("b")
    assert os.listdir(second) == []
    assert spares(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(second)]


async def test_keep_leaves_the_directory_and_its_result(tmp_path: Path) -> None:
    dirs = WorkDirs(str(tmp_path), keep=True)
    work = dirs.create("a")
    Path(work, ".aqsh-result").write_text("r")
    await dirs.release(work, os.path.join(work, ".aqsh-result"))
    assert Path(work, ".aqsh-result").read_text() == "r"
    assert spares(tmp_path) == []


def test_spares_of_stopped_workers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    live_pid = os.getppid()
    for name in (f"{SPARE_PREFIX}{dead_pid.pid}-x1", f"{SPARE_PREFIX}{os.getpid()}-y2",
                 f"{SPARE_PREFIX}{live_pid}-z3", f"{SPARE_PREFIX}garbage"):
        (tmp_path / name).mkdir()
    (tmp_path / f"{SPARE_PREFIX}{dead_pid.pid}-x1" / "f").write_text("x")
    WorkDirs(str(tmp_path)).create("a")
    assert spares(tmp_path) == [f"{SPARE_PREFIX}{live_pid}-z3"]


async def test_a_graceful_stop_leaves_no_spare_behind(redis: aioredis.Redis,
                                                      tmp_path: Path) -> None:
    spec = TaskSpec(name="quiet", script=make_script(tmp_path, "true\n"))
    root = tmp_path / "work"
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"quiet": spec}), redis,
                         RunnerSettings(work_root=str(root)))
    await runner(task("quiet"), Ctx("t1"))
    assert len(spares(root)) == 1
    await runner.aclose()
    assert os.listdir(root) == []


@pytest.mark.parametrize("task_id", ["../../etc/evil", "a/b", "..", ".", "x\ny", "nul\0id",
                                     "ü-日本", "", "a" * 200])
def test_any_task_id_becomes_a_plain_directory_name_inside_the_root(
    tmp_path: Path, task_id: str
) -> None:
    """Task ids come from any asynq client (Go callers choose their own): none can point a
    directory name outside the root, hide it, or carry control characters."""
    dirs = WorkDirs(str(tmp_path / "root"))
    work = dirs.create(task_id)
    assert os.path.dirname(work) == str(tmp_path / "root")
    name = os.path.basename(work)
    assert re.fullmatch(r"aqsh-[A-Za-z0-9_-]+", name), name
    assert len(name) < 80
    assert safe_name("0f8fad5b-d9cb-469f-a165-70867728950e") == (
        "0f8fad5b-d9cb-469f-a165-70867728950e")  # a UUID is kept whole


def test_the_work_root_is_created_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "root"
    old = os.umask(0)
    try:
        check_work_root(str(root))
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert root.stat().st_uid == os.geteuid()


def test_a_symlinked_shared_or_foreign_work_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        check_work_root(str(link))
    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o777, 0o1777, 0o770, 0o702):
        shared.chmod(mode)
        with pytest.raises(ConfigError, match="writable by group or others"):
            check_work_root(str(shared))
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ConfigError, match="belongs to uid 65534"):
            check_work_root(str(foreign))
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_work_root(str(plain))
    # A runner on a bad root refuses to run anything there.
    with pytest.raises(ConfigError):
        WorkDirs(str(shared)).create("t")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o755)
    check_work_root(str(readonly))  # not writable by others: accepted as it is


def test_a_worker_with_a_bad_work_root_stops_with_one_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    config = tmp_path / "tasks.yaml"
    config.write_text("tasks:\n  t: {script: t.sh}\n")
    (tmp_path / "t.sh").write_text("#!/bin/sh\n")
    (tmp_path / "t.sh").chmod(0o755)
    env = {**os.environ, "AQSH_RESULTS_DIR": str(shared), "AQSH_TASKS_CONFIG": str(config),
           "AQSH_TASKS_DIR": str(tmp_path), "AQSH_REDIS_ADDR": "127.0.0.1:1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "aqsh", "serve", "--mode", "worker"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"aqsh: work root {str(shared)!r} is writable by group or "
                                   f"others (mode 777); make it 0700")
