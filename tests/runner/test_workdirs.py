"""Working directories are fresh for every run even though empty ones are recycled: a new name,
no entries, mode 0700; anything a script changed is deleted, not reused; spares of a stopped
worker are swept."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import redis.asyncio as aioredis

from aqsh.engine.keys import log_key
from aqsh.runner.handler import RunnerSettings, ShellRunner
from aqsh.runner.spec import TasksConfig, TaskSpec
from aqsh.runner.workdirs import SPARE_PREFIX, WorkDirs
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
