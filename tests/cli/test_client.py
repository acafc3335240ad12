"""The client commands against a live ``aqsh serve``: what a person and a CI step see."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.cli.conftest import ROOT, LiveService, aqsh, aqsh_json, cli_env
from tests.fault_proxy import FaultProxy


def test_tasks_lists_types_with_typed_inputs(live_service: LiveService) -> None:
    listed = aqsh("tasks", url=live_service.url)
    assert listed.returncode == 0, listed.stderr
    assert "echo" in listed.stdout
    assert "name:string*" in listed.stdout
    assert "times:integer=1" in listed.stdout
    catalogue: Any = aqsh_json("tasks", url=live_service.url)
    assert {t["name"] for t in catalogue["tasks"]} == {"echo", "exit", "gated", "slow"}


def test_run_follow_streams_the_log_and_exits_zero(live_service: LiveService) -> None:
    # times and loud must arrive as an integer and a boolean: the server refuses strings.
    result = aqsh("run", "echo", "name=ci", "times=2", "loud=true", "--follow",
                  url=live_service.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["HELLO ci", "HELLO ci"]
    assert "completed" in result.stderr


def test_run_follow_exits_with_the_scripts_exit_code(live_service: LiveService) -> None:
    result = aqsh("run", "exit", "code=3", "--follow", url=live_service.url)
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == ["exiting with 3"]
    assert "archived" in result.stderr


def test_run_wait_json_prints_the_finished_task(live_service: LiveService) -> None:
    failed = aqsh("run", "exit", "code=7", "--wait", "--json", url=live_service.url)
    assert failed.returncode == 7, failed.stderr
    task = json.loads(failed.stdout)
    assert (task["state"], task["result"]["exit_code"]) == ("archived", 7)
    ok = aqsh("run", "echo", "name=w", "--wait", "--json", url=live_service.url)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(json.loads(ok.stdout)["result"]["data"]) == {"greeted": "w"}


def test_run_get_logs_of_a_task(live_service: LiveService) -> None:
    accepted: Any = aqsh_json("run", "echo", "name=abc", "times=3", url=live_service.url)
    task_id = accepted["id"]
    assert accepted["name"] == "echo"
    followed = aqsh("logs", task_id, "-f", url=live_service.url)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines() == ["hello abc"] * 3
    plain = aqsh("logs", task_id, url=live_service.url)
    assert plain.stdout.splitlines() == ["hello abc"] * 3
    task: Any = aqsh_json("get", task_id, url=live_service.url)
    assert task["state"] == "completed"
    assert task["input"] == {"name": "abc", "times": 3, "loud": False}
    human = aqsh("get", task_id, url=live_service.url)
    assert human.returncode == 0
    assert task_id in human.stdout
    assert "completed" in human.stdout


def test_run_in_schedules_and_cancel_archives_as_canceled(live_service: LiveService) -> None:
    accepted: Any = aqsh_json("run", "echo", "name=later", "--in", "10m", url=live_service.url)
    assert accepted["state"] == "scheduled"
    canceled = aqsh("cancel", accepted["id"], url=live_service.url)
    assert canceled.returncode == 0, canceled.stderr
    assert "canceled" in canceled.stdout
    task: Any = aqsh_json("get", accepted["id"], url=live_service.url)
    assert task["state"] == "canceled"
    again = aqsh("cancel", accepted["id"], url=live_service.url)
    assert again.returncode == 1
    assert "already finished" in again.stderr


def test_run_at_and_idempotency_key(live_service: LiveService) -> None:
    when = (datetime.now(UTC) + timedelta(days=200)).replace(microsecond=0)
    at = when.isoformat().replace("+00:00", "Z")
    first: Any = aqsh_json("run", "echo", "name=once", "--at", at, "--idempotency-key", "k-1",
                           url=live_service.url)
    second: Any = aqsh_json("run", "echo", "name=once", "--at", at, "--idempotency-key", "k-1",
                            url=live_service.url)
    assert first["id"] == second["id"]
    task: Any = aqsh_json("get", first["id"], url=live_service.url)
    assert (task["state"], task["next_process_at"]) == ("scheduled", at)


def test_mistakes_are_one_line_with_a_nonzero_exit(live_service: LiveService) -> None:
    unknown = aqsh("run", "nope", url=live_service.url)
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1, "aqsh: no task named 'nope' is configured (404 task_type_not_found)")
    bad_key = aqsh("run", "echo", "colour=red", url=live_service.url)
    assert bad_key.returncode == 2
    assert "has no input 'colour'" in bad_key.stderr
    bad_int = aqsh("run", "echo", "name=x", "times=many", url=live_service.url)
    assert (bad_int.returncode, bad_int.stderr.strip()) == (
        2, "aqsh: input times='many': expected an integer")
    refused = aqsh("run", "echo", "name=UPPER", url=live_service.url)  # the server's pattern
    assert refused.returncode == 1
    assert refused.stderr.startswith("aqsh: input for task 'echo' is invalid: name: must "
                                     "match [a-z]+")
    assert "422 invalid_input" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    missing = aqsh("get", "no-such-task", url=live_service.url)
    assert missing.returncode == 1
    assert "404" in missing.stderr
    nothing_there = aqsh("tasks", url="http://127.0.0.1:1")
    assert nothing_there.returncode == 1
    assert nothing_there.stderr.startswith("aqsh: cannot reach http://127.0.0.1:1")
    for result in (unknown, bad_key, refused, missing, nothing_there):
        assert "Traceback" not in result.stderr


def test_identity_headers_are_passed_through(live_service: LiveService) -> None:
    env = cli_env(live_service.url, AQSH_USER="alice", AQSH_GROUPS="ops")
    accepted: Any = aqsh_json("run", "echo", "name=me", env=env)
    assert accepted["submitted_by"] == "alice"
    # A type restricted to a group: hidden from GET /tasks without it, refused by the server
    # with its reason; with the group, listed and run, its inputs typed.
    refused = aqsh("run", "secret", "name=x", url=live_service.url)
    assert (refused.returncode, refused.stderr.strip()) == (
        1, "aqsh: task 'secret' is restricted to groups: ops (403 forbidden)")
    assert "secret" in aqsh("tasks", env=env).stdout
    ran = aqsh("run", "secret", "name=ops", "times=2", "--follow", env=env)
    assert (ran.returncode, ran.stdout.splitlines()) == (0, ["hello ops", "hello ops"])
    bearer = aqsh("run", "echo", "name=tok", "--json", "-H", "X-Extra: 1",
                  env=cli_env(live_service.url, AQSH_TOKEN="t0ken"))
    assert bearer.returncode == 0, bearer.stderr


async def test_follow_reconnects_a_dropped_stream_without_losing_or_repeating_lines(
    live_service: LiveService, tmp_path: Path
) -> None:
    """The stream is cut mid-task; the CLI reconnects with Last-Event-ID and the output is
    every line exactly once, and the exit code is still the script's."""
    port = int(live_service.url.rsplit(":", 1)[1])
    proxy = await FaultProxy(port).start()
    gate = tmp_path / "gate"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aqsh", "run", "gated", f"gate={gate}", "code=4", "--follow",
        cwd=ROOT, env=cli_env(f"http://127.0.0.1:{proxy.port}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert first == b"before\n"
        accepted_before = proxy.accepted
        proxy.drop_all()
        gate.touch()
        rest, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proxy.aclose()
    assert proc.returncode == 4, stderr.decode()
    assert rest.decode().splitlines() == ["after-1", "after-2"]
    assert "reconnecting" in stderr.decode()
    assert proxy.accepted > accepted_before


async def test_follow_of_a_task_canceled_while_running_exits_nonzero(
    live_service: LiveService,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aqsh", "run", "slow", "--follow", cwd=ROOT,
        env=cli_env(live_service.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        submitted = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode().split()
        assert submitted[:2] == ["submitted", "slow"]
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"started\n"
        canceled = await asyncio.to_thread(aqsh, "cancel", submitted[2], url=live_service.url)
        assert canceled.returncode == 0, canceled.stderr
        assert canceled.stdout.split()[-1] in ("canceling", "canceled")
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # SIGTERM ended the script: a shell would report 128 + 15.
    assert proc.returncode == 143, stderr.decode()


def test_runs_lists_filters_and_pages(live_service: LiveService) -> None:
    """`aqsh runs` on GET /runs: newest first, filtered by task, state and submitter, and a
    --limit met by following the server's cursor."""
    env = cli_env(live_service.url, AQSH_USER="runs-carol")
    ids = []
    for name in ("aa", "bb", "cc"):
        done = aqsh("run", "echo", f"name={name}", "--wait", "--json", env=env)
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["id"])
    failed = aqsh("run", "exit", "code=5", "--wait", "--json", env=env)
    assert failed.returncode == 5, failed.stderr
    failed_id = json.loads(failed.stdout)["id"]
    other = cli_env(live_service.url, AQSH_USER="runs-dave")
    assert aqsh("run", "echo", "name=dd", "--wait", env=other).returncode == 0

    mine: Any = aqsh_json("runs", "--mine", env=env)
    assert [r["id"] for r in mine["runs"]] == [failed_id, *reversed(ids)]
    assert {r["submitted_by"] for r in mine["runs"]} == {"runs-carol"}
    assert mine["next"] is None

    echoes: Any = aqsh_json("runs", "--mine", "--task", "echo", "--state", "completed", env=env)
    assert [r["id"] for r in echoes["runs"]] == list(reversed(ids))
    archived: Any = aqsh_json("runs", "--submitted-by", "runs-carol", "--state", "archived",
                              url=live_service.url)
    assert [(r["id"], r["result"]["exit_code"]) for r in archived["runs"]] == [(failed_id, 5)]

    first: Any = aqsh_json("runs", "--mine", "--limit", "2", env=env)
    assert [r["id"] for r in first["runs"]] == [failed_id, ids[2]]
    assert first["next"]
    rest: Any = aqsh_json("runs", "--mine", "--cursor", first["next"], env=env)
    assert [r["id"] for r in rest["runs"]] == [ids[1], ids[0]]

    # A width of our own: a narrow inherited COLUMNS would fold the table's cells.
    human = aqsh("runs", "--mine", "--limit", "2", env={**env, "COLUMNS": "200"})
    assert human.returncode == 0, human.stderr
    rows = [line.split() for line in human.stdout.splitlines()[1:]]
    assert [row[:3] for row in rows] == [[failed_id, "exit", "archived"],
                                         [ids[2], "echo", "completed"]]
    assert rows[0][-1] == "5"
    assert "more runs" in human.stderr


def test_runs_mistakes_are_one_line(live_service: LiveService) -> None:
    no_identity = aqsh("runs", "--mine", url=live_service.url)
    assert no_identity.returncode == 2
    assert "--mine needs your identity" in no_identity.stderr
    bad_state = aqsh("runs", "--state", "done", url=live_service.url)
    assert bad_state.returncode == 2
    bad_time = aqsh("runs", "--since", "yesterday", url=live_service.url)
    assert bad_time.returncode == 1
    assert bad_time.stderr.strip() == (
        "aqsh: since must be an RFC 3339 time with a zone, e.g. 2026-01-31T12:00:00Z "
        "(400 invalid_query)")
    nothing: Any = aqsh_json("runs", "--submitted-by", "nobody-at-all", url=live_service.url)
    assert nothing == {"runs": [], "next": None}
    for result in (no_identity, bad_state, bad_time):
        assert "Traceback" not in result.stderr


def test_every_client_command_has_examples_in_its_help() -> None:
    from aqsh.cli.client import COMMANDS

    for command in COMMANDS:
        result = aqsh(str(command.name), "--help")
        assert result.returncode == 0, result.stderr
        assert "Example" in result.stdout, command.name
        assert f"aqsh {command.name} " in result.stdout.split("Example", 1)[1], command.name
