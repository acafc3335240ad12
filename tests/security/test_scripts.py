"""Attacks by the scripts themselves, run through a real worker process: reading the worker's
secrets through /proc, smuggling shell syntax or control characters through inputs, shadowing
the variables that steer the shell or the loader, and processes that try to outlive their task.

The /proc tests run the worker as ``nobody`` when the suite runs as root: a root script holds
CAP_SYS_PTRACE, which reads any process's /proc files whatever the worker does (one test shows
exactly that, and that the password is gone from the environment all the same)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from aqsh.engine.client import Client
from aqsh.engine.task import SkipRetry
from aqsh.errors import ConfigError
from aqsh.redis_process import RedisProcess
from aqsh.runner.handler import RunnerSettings, ShellRunner
from aqsh.runner.inputs import InputSpec
from aqsh.runner.process import group_keeper, run_process
from aqsh.runner.spec import TaskSpec, load_tasks
from aqsh.settings import load_settings
from tests.runner.test_runner import Ctx, make_script, runner_for, task
from tests.security.conftest import PASSWORD, WorkerFactory, setpriv, unprivileged
from tests.support import wait_until

CANARY = "canary-9f1c2e-worker-only"

#: Walks from the worker ($PPID) up to pid 1 and tries, for each process, to open environ and
#: mem, to list fd/ and to resolve fd/0..31; prints one line per attempt: "<what> <pid> open"
#: or "<what> <pid> denied", plus "secret-in-cmdline <pid>" should the password be there.
PROBE = r"""
pid=$PPID
while [ "$pid" -gt 0 ]; do
  for what in environ mem; do
    if (exec 3< "/proc/$pid/$what") 2>/dev/null; then echo "$what $pid open"
    else echo "$what $pid denied"; fi
  done
  if ls "/proc/$pid/fd/" >/dev/null 2>&1; then echo "fd-list $pid open"
  else echo "fd-list $pid denied"; fi
  n=0; opened=""
  while [ $n -lt 32 ]; do
    if readlink "/proc/$pid/fd/$n" >/dev/null 2>&1; then opened="$opened $n"; fi
    n=$((n+1))
  done
  if [ -n "$opened" ]; then echo "fd-links $pid open"; else echo "fd-links $pid denied"; fi
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "$SECRET_PATTERN"; then
    echo "secret-in-cmdline $pid"; fi
  if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q "$SECRET_PATTERN"; then
    echo "secret-in-environ $pid"; fi
  stat=$(cat "/proc/$pid/stat"); stat=${stat##*) }; set -- $stat; pid=$2
done
echo walked
"""


def _probe_lines(result: dict[str, object]) -> list[str]:
    data = result.get("data")
    assert isinstance(data, str), result
    return data.splitlines()


PROBE_SCRIPT = PROBE.replace("echo ", 'echo >> "$AQSH_RESULT_FILE" ')


async def test_scripts_cannot_read_the_workers_or_any_ancestors_proc_files(
    start_worker: WorkerFactory,
) -> None:
    user = unprivileged()
    worker = await start_worker({"probe": PROBE_SCRIPT}, user=user,
                                env={"CANARY": CANARY,
                                     "SECRET_PATTERN": "s3cre[t]-redis\\|canary-9f1[c]"})
    result = await worker.run("probe")
    lines = _probe_lines(result)
    assert lines[-1] == "walked"
    pids = {int(line.split()[1]) for line in lines[:-1]}
    assert worker.pid in pids  # the worker itself was tried ...
    assert len(pids) >= 2  # ... and what started it, up to pid 1
    assert [line for line in lines[:-1] if not line.endswith(" denied")] == []


async def test_the_password_is_gone_from_the_environment_even_for_root(
    start_worker: WorkerFactory,
) -> None:
    """What holds under root: a root script (CAP_SYS_PTRACE, as on a host without a container
    runtime dropping it) can open the worker's /proc files. Non-dumpable cannot stop that, but
    the password it was given is wiped from the environment block /proc shows once read."""
    if os.geteuid() != 0:
        pytest.skip("shows what a root script can do; the suite is not running as root")
    worker = await start_worker({"probe": PROBE_SCRIPT}, user=None,
                                env={"CANARY": CANARY, "SECRET_PATTERN": "s3cre[t]-redis"})
    lines = _probe_lines(await worker.run("probe"))
    assert f"environ {worker.pid} open" in lines  # documented: root reads it
    assert not any(line.startswith("secret-in-") for line in lines), lines
    environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
    assert CANARY.encode() in environ  # the read works: other variables are still there
    assert PASSWORD.encode() not in environ
    assert b"AQSH_REDIS_PASSWORD=" in environ  # the name remains, its value is zeroed


async def test_a_password_in_the_redis_url_is_wiped_too(
    start_worker: WorkerFactory, password_redis: RedisProcess
) -> None:
    if os.geteuid() != 0:
        pytest.skip("reads the worker's environ as root")
    url = password_redis.url.replace("redis://", f"redis://:{PASSWORD}@")
    worker = await start_worker({"ok": 'echo ok > "$AQSH_RESULT_FILE"\n'}, user=None,
                                env={"AQSH_REDIS_ADDR": url, "CANARY": CANARY}, no_password=True)
    assert await worker.run("ok") == {"exit_code": 0, "data": "ok\n"}  # it authenticated
    environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
    assert CANARY.encode() in environ
    assert PASSWORD.encode() not in environ


async def test_a_root_worker_without_cap_sys_ptrace_keeps_its_memory_and_fds(
    start_worker: WorkerFactory,
) -> None:
    """The container default (Docker and Kubernetes drop CAP_SYS_PTRACE): a root script cannot
    open the non-dumpable worker's memory or its file descriptors. It can still read environ
    (root's DAC override opens the root-owned file, and the kernel lets that read through), and
    list the fd numbers — which is why the password is wiped from the environment as well."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop a capability from a root worker")
    drop = [*setpriv((0, 0))[:1], "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--"]
    worker = await start_worker({"probe": PROBE_SCRIPT}, user=None, wrapper=drop,
                                env={"SECRET_PATTERN": "s3cre[t]-redis"})
    lines = _probe_lines(await worker.run("probe"))
    assert f"mem {worker.pid} denied" in lines
    assert f"fd-links {worker.pid} denied" in lines
    assert f"secret-in-environ {worker.pid}" not in lines


async def test_the_password_file_is_read_and_never_in_the_environment(
    start_worker: WorkerFactory,
) -> None:
    worker = await start_worker({"ok": 'echo ok > "$AQSH_RESULT_FILE"\n'}, user=unprivileged(),
                                password_file=True)
    assert await worker.run("ok") == {"exit_code": 0, "data": "ok\n"}  # it authenticated
    if os.geteuid() == 0:
        assert PASSWORD.encode() not in Path(f"/proc/{worker.pid}/environ").read_bytes()
    work = worker.base / "work"
    assert len(os.listdir(work)) == 1  # the run's directory, kept as a spare for the next
    worker.stop()
    assert worker.proc.returncode == 0
    assert os.listdir(work) == []  # a graceful stop leaves no spare behind


def test_password_file_settings(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pa ss\n")
    assert load_settings({"AQSH_REDIS_PASSWORD_FILE": str(secret)}).redis_password == "pa ss"
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_settings({"AQSH_REDIS_PASSWORD_FILE": str(secret), "AQSH_REDIS_PASSWORD": "x"})
    with pytest.raises(ConfigError, match="cannot be read: No such file"):
        load_settings({"AQSH_REDIS_PASSWORD_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings({"AQSH_REDIS_PASSWORD_FILE": str(tmp_path / "empty")})


# --- inputs -----------------------------------------------------------------------------------

HOSTILE_VALUES = [
    "$(touch {out}/pwned-subst)",
    "`touch {out}/pwned-backtick`",
    "x; touch {out}/pwned-semicolon",
    "x && touch {out}/pwned-and | cat",
    "x\ntouch {out}/pwned-newline",
    "'\"; touch {out}/pwned-quotes; echo \"'",
    "$HOME ${{PATH}} * ? [a] ~ > {out}/pwned-redirect",
    "-e --help",
]


@pytest.mark.parametrize("template", HOSTILE_VALUES)
async def test_shell_syntax_in_inputs_is_data_never_code(
    redis: aioredis.Redis, tmp_path: Path, template: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    value = template.format(out=out)
    config_path = tmp_path / "tasks.yaml"
    make_script(tmp_path, 'printf "%s" "$VALUE" > "$AQSH_RESULT_FILE"\n', "echo.sh")
    config_path.write_text(
        "tasks:\n  echo:\n    script: echo.sh\n"
        "    input: [{name: value, env: VALUE, required: true}]\n")
    config = load_tasks(str(config_path), str(tmp_path))
    runner = ShellRunner(lambda: config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    ctx = Ctx("t1")
    result = await runner(task("echo", {"value": value}), ctx)
    assert result is not None
    assert json.loads(result) == {"exit_code": 0, "data": value}  # arrived byte for byte
    assert os.listdir(out) == []  # and nothing it contained ran


async def test_a_nul_in_an_input_is_refused_before_anything_runs(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    spec = TaskSpec(name="echo", script=make_script(tmp_path, f'touch "{marker}"\n'),
                    inputs=(InputSpec(name="value", env="VALUE"),))
    with pytest.raises(SkipRetry, match="NUL"):
        await runner_for(redis, tmp_path, spec)(task("echo", {"value": "a\0b"}), Ctx("t1"))
    assert not marker.exists()


@pytest.mark.parametrize("env", ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV",
                                 "IFS", "SHELLOPTS", "AQSH_RESULT_FILE", "BASH_FUNC_x%%"])
def test_inputs_cannot_set_variables_that_steer_the_shell_or_loader(
    tmp_path: Path, env: str
) -> None:
    make_script(tmp_path, "true\n", "t.sh")
    config_path = tmp_path / "tasks.yaml"
    config_path.write_text("tasks:\n  t:\n    script: t.sh\n"
                           f"    input: [{{name: x, env: '{env}'}}]\n")
    with pytest.raises(ConfigError):
        load_tasks(str(config_path), str(tmp_path))


# --- processes that try to outlive their task ---------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_daemon_the_script_forks_is_killed_with_its_group(
    start_worker: WorkerFactory,
) -> None:
    """The classic double fork (the daemon's parent exits, it is re-parented, it ignores HUP and
    TERM) still leaves it in the task's process group, which is killed when the script exits."""
    daemon = r"""
    ( trap '' HUP TERM; sh -c 'echo $$ > "$OUT/daemon.pid"; sleep 3; touch "$OUT/daemon-ran"' & ) &
    while [ ! -s "$OUT/daemon.pid" ]; do sleep 0.01; done
    echo forked > "$AQSH_RESULT_FILE"
    """
    worker = await start_worker({"daemon": daemon}, user=unprivileged())
    assert await worker.run("daemon") == {"exit_code": 0, "data": "forked\n"}
    pid = int((worker.out / "daemon.pid").read_text())
    await wait_until(lambda: not _alive(pid), timeout_s=10, message="daemon killed")
    assert not (worker.out / "daemon-ran").exists()


async def test_setsid_escapes_the_group_as_documented(start_worker: WorkerFactory) -> None:
    """The documented limit: a process that calls setsid() leaves the task's process group, so
    neither the group kill at the end of the task nor a stop reaches it. aqsh does not pretend
    otherwise (SECURITY.md: scripts share the worker's uid and are trusted code)."""
    escape = r"""
    setsid sh -c 'echo $$ > "$OUT/escaped.pid"; exec sleep 300' < /dev/null > /dev/null 2>&1 &
    while [ ! -s "$OUT/escaped.pid" ]; do sleep 0.01; done
    echo escaped > "$AQSH_RESULT_FILE"
    """
    worker = await start_worker({"escape": escape}, user=unprivileged())
    assert await worker.run("escape") == {"exit_code": 0, "data": "escaped\n"}
    pid = int((worker.out / "escaped.pid").read_text())
    try:
        assert os.getsid(pid) == pid  # a session (and group) of its own
        worker.stop()  # not even the worker's stop reaches it
        assert worker.proc.returncode == 0
        assert _alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


async def test_a_script_and_its_children_die_with_their_worker_even_by_sigkill(
    start_worker: WorkerFactory,
) -> None:
    """Before: the script carried on under PID 1 and did its side effect, and the recovered
    retry did it again. Now the worker's keeper kills the script's group the moment the worker
    is gone, however it died."""
    silent = r"""
    sh -c 'echo $$ > "$OUT/child.pid"; exec sleep 300' &
    while [ ! -s "$OUT/child.pid" ]; do sleep 0.01; done
    echo $$ > "$OUT/script.pid"
    sleep 30
    touch "$OUT/side-effect"
    """
    worker = await start_worker({"silent": silent}, user=unprivileged())
    await Client(worker.redis).enqueue("silent", b"{}", max_retry=0)
    await wait_until(lambda: (worker.out / "script.pid").exists(), timeout_s=30,
                     message="script running")
    script_pid = int((worker.out / "script.pid").read_text())
    child_pid = int((worker.out / "child.pid").read_text())
    assert _alive(script_pid)
    assert _alive(child_pid)
    worker.proc.kill()
    worker.proc.wait()
    await wait_until(lambda: not _alive(script_pid) and not _alive(child_pid), timeout_s=10,
                     interval_s=0.05, message="script and child killed after the worker died")
    assert not (worker.out / "side-effect").exists()


async def test_a_killed_keeper_is_restarted_and_told_every_live_group(tmp_path: Path) -> None:
    """The keeper is a safety net; if it dies alone, the next start or exit of a script starts
    a new one with every group still running, so a later worker death still kills them."""
    keeper = group_keeper()
    first = asyncio.create_task(run_process(
        [make_script(tmp_path, "exec sleep 300\n", "a.sh")], env={}, cwd=str(tmp_path),
        sink=_Lines()))
    await wait_until(lambda: len(keeper.groups) == 1, message="first script registered")
    old = keeper.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_until(lambda: not _alive(old), message="keeper gone")
    second = asyncio.create_task(run_process(
        [make_script(tmp_path, "exec sleep 300\n", "b.sh")], env={}, cwd=str(tmp_path),
        sink=_Lines()))
    await wait_until(lambda: len(keeper.groups) == 2, message="second script registered")
    assert keeper.pid not in (None, old)  # restarted, and told of both groups
    # Closing the keeper is what the worker's death looks like to it: both groups are killed.
    keeper.close()
    outcomes = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert [o.exit_code for o in outcomes] == [-9, -9]


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def put_lines(self, stream: str, lines: list[str]) -> None:
        self.lines.extend(lines)

    @property
    def full(self) -> bool:
        return False

    async def wait_for_room(self) -> None:
        return None
