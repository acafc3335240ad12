"""A script owns its work directory, so ``$AQSH_RESULT_FILE`` is hostile input: a FIFO, a
symlink, a directory, a device or an over-size file fails that task with a clear error, while
the worker goes on running other tasks (before, a FIFO froze the whole event loop and a symlink
published any file the worker could read as the task's result)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from aqsh.engine import keys, wire
from aqsh.engine.client import Client
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.runner.handler import RunnerSettings, ShellRunner, shell_retry_delay
from aqsh.runner.result import decode_result, read_result_file
from aqsh.runner.spec import TasksConfig, TaskSpec
from tests.runner.test_runner import Ctx, make_script, task
from tests.support import wait_until

HOSTILE = {
    "fifo": ('mkfifo "$AQSH_RESULT_FILE"\n', "result file is a FIFO, not a regular file"),
    "symlink": ('ln -s "$SECRET" "$AQSH_RESULT_FILE"\n',
                "result file is a symbolic link; write a regular file"),
    "symlink-to-fifo": ('mkfifo fifo; ln -s "$PWD/fifo" "$AQSH_RESULT_FILE"\n',
                        "result file is a symbolic link; write a regular file"),
    "directory": ('mkdir "$AQSH_RESULT_FILE"\n', "result file is a directory, not a regular file"),
    "device": ('mknod "$AQSH_RESULT_FILE" c 1 3 || { echo no-mknod; exit 0; }\n',
               "result file is a device, not a regular file"),
    "hardlink": ('ln "$SECRET" "$AQSH_RESULT_FILE"\n',
                 "result file has other hard links; write a file of its own"),
    "oversize": ('head -c 2000000 /dev/zero > "$AQSH_RESULT_FILE"\n',
                 "result file is 2000000 bytes, over the 1048576 byte limit"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_a_hostile_result_file_fails_its_task_and_the_worker_carries_on(
    redis: aioredis.Redis, tmp_path: Path, kind: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)
    body, expected = HOSTILE[kind]
    hostile = TaskSpec(name="hostile", script=make_script(tmp_path, body, "hostile.sh"),
                       max_retry=0)
    # Runs while the worker looks at the hostile file, and must still finish: the event loop
    # was not blocked (before the fix, the FIFO's open() never returned).
    steady = TaskSpec(name="steady", script=make_script(
        tmp_path, 'sleep 1; echo done > "$AQSH_RESULT_FILE"\n', "steady.sh"), max_retry=0)
    config = TasksConfig(path="t", tasks={"hostile": hostile, "steady": steady})
    runner = ShellRunner(lambda: config, redis, RunnerSettings(
        work_root=str(tmp_path / "work"), base_env={"PATH": os.environ["PATH"],
                                                    "SECRET": str(secret)},
        env_allowlist=("PATH", "SECRET")))
    server = Server(RedisBroker(redis), runner, concurrency=2, queues={"default": 1},
                    retry_delay=shell_retry_delay(lambda: config), heartbeat_interval_s=0.5)
    await server.start()
    q = keys.queue_keys("default")
    try:
        client = Client(redis)
        steady_id = (await client.enqueue("steady", b"{}", max_retry=0, retention=60)).id
        hostile_id = (await client.enqueue("hostile", b"{}", max_retry=0, retention=60)).id
        await wait_until(lambda: redis.zscore(q.archived, hostile_id)
                         or redis.zscore(q.completed, hostile_id),
                         timeout_s=30, message="hostile task finished")
        await wait_until(lambda: redis.zscore(q.completed, steady_id), timeout_s=30,
                         message="the other task completed")
        hostile_hash = await redis.hgetall(q.task(hostile_id))
        steady_hash = await redis.hgetall(q.task(steady_id))
    finally:
        await server.stop(shutdown_timeout_s=1)
    assert decode_result(steady_hash[b"result"]).data == "done\n"
    lines = [f[b"line"] for _, f in await redis.xrange(f"logs:{hostile_id}") if b"line" in f]
    if kind == "device" and lines == [b"no-mknod"]:
        pytest.skip("mknod is not permitted here")
    assert await redis.zscore(q.archived, hostile_id) is not None
    assert wire.decode_task(hostile_hash[b"msg"]).error_msg == expected
    stored = msgspec.json.decode(hostile_hash[b"result"])
    assert stored == {"exit_code": 0, "error": expected}
    assert b"TOPSECRET" not in hostile_hash[b"result"]


async def test_a_script_that_swaps_its_directory_for_a_symlink_cannot_redirect_the_read(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """The result is read through a descriptor of the directory opened before the script ran,
    so a directory renamed away and replaced by a symlink to somewhere else leads nowhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".aqsh-result").write_text("TOPSECRET")
    swap = TaskSpec(name="swap", script=make_script(tmp_path, f"""\
        cd /
        mv "$AQSH_WORK_DIR" "$AQSH_WORK_DIR.moved"
        ln -s "{elsewhere}" "$AQSH_WORK_DIR"
        """, "swap.sh"))
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"swap": swap}), redis,
                         RunnerSettings(work_root=str(tmp_path / "work")))
    result = await runner(task("swap"), Ctx("t1"))
    assert result == b'{"exit_code":0}'  # the moved directory has no result; nothing leaked
    # Cleaning up did not follow the symlink either: the file elsewhere is still there.
    assert (elsewhere / ".aqsh-result").read_text() == "TOPSECRET"
    assert not any(p.is_symlink() for p in (tmp_path / "work").iterdir())


def test_a_file_swapped_for_a_fifo_after_the_check_cannot_block_the_read(tmp_path: Path) -> None:
    """The type is decided by fstat on the opened descriptor, and the open does not block: even
    a FIFO that appears between lstat and open is refused without waiting for a writer."""
    path = tmp_path / "r"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader exists, no writer: open is fine
    try:
        assert read_result_file(str(path)) == (None, "result file is a FIFO, not a regular file")
    finally:
        os.close(fd)


def test_a_regular_result_file_is_read_whole_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "r"
    path.write_bytes(b'{"ok": true}\xff')
    assert read_result_file(str(path)) == ('{"ok": true}\ufffd', None)
    path.write_bytes(b"x" * 11)
    assert read_result_file(str(path), max_bytes=10) == (
        None, "result file is 11 bytes, over the 10 byte limit")
    assert read_result_file(str(tmp_path / "missing")) == (None, None)
