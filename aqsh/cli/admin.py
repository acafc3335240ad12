"""``aqsh admin``: the asynq CLI's job, straight on Redis, through aqsh.engine.inspect.Inspector
(what the API and Asynqmon read), so the figures are the ones the Go Inspector gives and tasks
enqueued by any asynq client are listed and handled alike.

Redis is found as the service finds it: AQSH_REDIS_ADDR (or the Sentinel/Cluster settings) and
AQSH_REDIS_PASSWORD, unless ``--redis`` says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import msgspec

from aqsh import errors
from aqsh.cli.output import (
    CliError,
    fields,
    human_bytes,
    human_duration,
    iso_from_unix,
    json_option,
    out,
    print_json,
    state_text,
    table,
)
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.engine.inspect import QueueInfo, ServerStatus
from aqsh.engine.models import SchedulerEnqueueEvent, SchedulerEntry, TaskInfo, TaskState

T = TypeVar("T")
STATES = [state.value for state in TaskState]
#: States whose tasks the per-state table shows, in asynq's order.
TABLE_STATES = ("active", "pending", "aggregating", "scheduled", "retry", "archived",
                "completed")


class AdminContext:
    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url

    def redis_settings(self) -> RedisSettings:
        from aqsh.settings import load_settings

        try:
            settings = load_settings(None)
        except errors.ConfigError as exc:
            raise CliError(exc.message, exit_code=2) from None
        if self.redis_url:
            return RedisSettings(url=self.redis_url, password=settings.redis_password)
        if settings.redis_addr == "embedded":
            raise CliError("AQSH_REDIS_ADDR=embedded is private to the running service: "
                           "point --redis at its URL (logged as redis.embedded)", exit_code=2)
        return RedisSettings(url=settings.redis_addr, password=settings.redis_password,
                             sentinel_addrs=settings.redis_sentinel_addrs,
                             sentinel_master=settings.redis_sentinel_master,
                             cluster_addrs=settings.redis_cluster_addrs)

    def run(self, action: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``action(inspector)`` on a fresh connection; engine errors become one line."""
        from aqsh.engine.inspect import Inspector

        async def go() -> T:
            client = create_client(self.redis_settings())
            try:
                return await action(Inspector(client))
            finally:
                await client.aclose()

        try:
            return asyncio.run(go())
        except errors.AqshError as exc:
            raise CliError(str(exc)) from None


pass_admin = click.make_pass_decorator(AdminContext)


def examples(*lines: str) -> str:
    """A --help epilog; ``\b`` keeps click from re-wrapping the command lines."""
    return "\b\nExamples:\n" + "".join(f"  {line}\n" for line in lines)


@click.group(epilog="""\b
Examples:
  aqsh admin queues
  aqsh admin tasks ls --queue default --state archived
  aqsh admin task run 2f1c… --queue default
  aqsh admin queue pause critical
""")
@click.option("--redis", "redis_url", metavar="URL",
              help="Redis to inspect (default: AQSH_REDIS_ADDR and its companions).")
@click.pass_context
def admin(ctx: click.Context, redis_url: str | None) -> None:
    """Inspect and operate asynq's queues directly on Redis (like the asynq CLI)."""
    ctx.obj = AdminContext(redis_url)


# ---------------------------------------------------------------------------- JSON shapes
def queue_json(info: QueueInfo) -> dict[str, Any]:
    return msgspec.to_builtins(info)  # type: ignore[no-any-return]


def _text(raw: bytes | None) -> str | None:
    return raw.decode("utf-8", "replace") if raw is not None else None


def task_json(info: TaskInfo) -> dict[str, Any]:
    msg = info.message
    return {
        "id": msg.id, "queue": msg.queue, "type": msg.type, "state": info.state.value,
        "payload": _text(msg.payload), "payload_b64": base64.b64encode(msg.payload).decode(),
        "headers": dict(msg.headers), "max_retry": msg.retry, "retried": msg.retried,
        "last_error": msg.error_msg or None, "last_failed_at": msg.last_failed_at_s or None,
        "timeout_s": msg.timeout_s, "deadline": msg.deadline_s or None,
        "group": msg.group_key or None, "next_process_at": info.next_process_at_s or None,
        "is_orphaned": info.is_orphaned, "retention_s": msg.retention_s,
        "completed_at": msg.completed_at_s or None, "result": _text(info.result),
    }


def server_json(status: ServerStatus) -> dict[str, Any]:
    info = status.info
    return {
        "id": info.server_id, "host": info.host, "pid": info.pid,
        "concurrency": info.concurrency, "queues": dict(info.queues),
        "strict": info.strict_priority, "status": info.status,
        "started": info.start_time_ns // 1_000_000_000,
        "workers": [
            {"task_id": w.task_id, "type": w.task_type, "payload": _text(w.task_payload),
             "queue": w.queue, "started": w.start_time_ns // 1_000_000_000,
             "deadline": w.deadline_ns // 1_000_000_000}
            for w in sorted(status.workers, key=lambda w: w.start_time_ns)
        ],
    }


def entry_json(entry: SchedulerEntry) -> dict[str, Any]:
    prev = entry.prev_enqueue_time_ns
    return {"id": entry.id, "spec": entry.spec, "type": entry.task_type,
            "payload": _text(entry.task_payload), "options": list(entry.enqueue_options),
            "next": entry.next_enqueue_time_ns // 1_000_000_000,
            "prev": prev // 1_000_000_000 if prev is not None else None}


def event_json(event: SchedulerEnqueueEvent) -> dict[str, Any]:
    return {"task_id": event.task_id, "enqueued_at": event.enqueue_time_ns // 1_000_000_000}


# ---------------------------------------------------------------------------- overview
async def _all_queue_infos(inspector: Any) -> list[QueueInfo]:
    infos = []
    for name in await inspector.queues():
        try:
            infos.append(await inspector.queue_info(name))
        except errors.QueueNotFound:  # removed between the two calls
            continue
    return infos


@admin.command(epilog=examples(
    'aqsh admin stats',
    'aqsh admin stats --json | jq .queues',
))
@json_option
@pass_admin
def stats(ctx: AdminContext, as_json: bool) -> int:
    """Totals by state and by queue, today's processed and failed, and Redis itself."""

    async def collect(inspector: Any) -> dict[str, Any]:
        infos = await _all_queue_infos(inspector)
        redis_info: dict[str, Any] = {}
        try:
            raw = await inspector.redis.info()
            redis_info = {"version": raw.get("redis_version"),
                          "uptime_s": raw.get("uptime_in_seconds"),
                          "connected_clients": raw.get("connected_clients"),
                          "used_memory_bytes": raw.get("used_memory"),
                          "used_memory_peak_bytes": raw.get("used_memory_peak")}
        except Exception:  # INFO may be renamed or refused on managed Redis: no Redis section
            redis_info = {}
        states = {state: sum(getattr(q, state) for q in infos) for state in TABLE_STATES}
        processed = sum(q.processed for q in infos)
        failed = sum(q.failed for q in infos)
        return {"states": states, "queues": [queue_json(q) for q in infos],
                "processed": processed, "failed": failed,
                "error_rate": failed / processed if processed else 0.0, "redis": redis_info}

    figures = ctx.run(collect)
    if as_json:
        print_json(figures)
        return 0
    table([s.upper() for s in TABLE_STATES], [[figures["states"][s] for s in TABLE_STATES]],
          title="Tasks by state")
    out.print()
    table(["QUEUE", "SIZE", "PAUSED"], ((q["queue"], q["size"], q["paused"])
                                        for q in figures["queues"]), title="Tasks by queue")
    out.print()
    fields([("processed", figures["processed"]), ("failed", figures["failed"]),
            ("error rate", f"{figures['error_rate']:.2%}")], title="Today (UTC)")
    if figures["redis"]:
        out.print()
        info = figures["redis"]
        fields([("version", info["version"]), ("uptime", human_duration(
            float(info["uptime_s"] or 0))), ("connections", info["connected_clients"]),
            ("memory", human_bytes(int(info["used_memory_bytes"] or 0))),
            ("peak memory", human_bytes(int(info["used_memory_peak_bytes"] or 0)))],
            title="Redis")
    return 0


def _queue_row(q: QueueInfo) -> list[Any]:
    return [q.queue, "paused" if q.paused else "run", q.size, q.pending, q.active,
            q.scheduled, q.retry, q.archived, q.completed, q.aggregating,
            human_duration(q.latency_s), human_bytes(q.memory_usage_bytes), q.processed,
            q.failed]


QUEUE_COLUMNS = ["QUEUE", "STATE", "SIZE", "PENDING", "ACTIVE", "SCHEDULED", "RETRY",
                 "ARCHIVED", "COMPLETED", "AGGREGATING", "LATENCY", "MEMORY", "PROCESSED",
                 "FAILED"]


@admin.command(epilog=examples(
    'aqsh admin queues',
    "aqsh admin queues --json | jq -r '.[] | select(.paused) | .queue'",
))
@json_option
@pass_admin
def queues(ctx: AdminContext, as_json: bool) -> int:
    """Every queue: sizes by state, latency, paused, memory, today's processed and failed."""
    infos = ctx.run(_all_queue_infos)
    if as_json:
        print_json([queue_json(q) for q in infos])
        return 0
    table(QUEUE_COLUMNS, (_queue_row(q) for q in infos))
    return 0


@admin.group(epilog=examples(
    'aqsh admin queue inspect default',
    'aqsh admin queue pause critical',
    'aqsh admin queue unpause critical',
    'aqsh admin queue remove old-queue',
))
def queue() -> None:
    """One queue: inspect, pause, unpause."""


@queue.command("inspect")
@click.argument("name")
@click.option("--days", default=7, show_default=True, help="Days of daily history to show.")
@json_option
@pass_admin
def queue_inspect(ctx: AdminContext, name: str, days: int, as_json: bool) -> int:
    """A queue's figures and its daily processed/failed history."""

    async def collect(inspector: Any) -> tuple[QueueInfo, list[Any]]:
        return await inspector.queue_info(name), await inspector.history(name, days)

    info, history = ctx.run(collect)
    if as_json:
        print_json({**queue_json(info), "history": [msgspec.to_builtins(d) for d in history]})
        return 0
    fields(zip(QUEUE_COLUMNS, _queue_row(info), strict=True), title=f"Queue {name}")
    out.print()
    table(["DATE", "PROCESSED", "FAILED"], ((d.date, d.processed, d.failed) for d in history),
          title="Daily (UTC)")
    return 0


@queue.command("pause")
@click.argument("name")
@pass_admin
def queue_pause(ctx: AdminContext, name: str) -> int:
    """Stop workers (aqsh and Go) taking tasks from a queue; enqueues still land."""
    ctx.run(lambda inspector: inspector.pause_queue(name))
    out.print(f"queue {name} paused", markup=False)
    return 0


@queue.command("unpause")
@click.argument("name")
@pass_admin
def queue_unpause(ctx: AdminContext, name: str) -> int:
    """Let workers take tasks from a paused queue again."""
    ctx.run(lambda inspector: inspector.unpause_queue(name))
    out.print(f"queue {name} unpaused", markup=False)
    return 0


@queue.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Remove it with its waiting tasks (never while tasks are active).")
@pass_admin
def queue_remove(ctx: AdminContext, name: str, force: bool) -> int:
    """Remove a queue; refused while it holds tasks, unless --force."""
    ctx.run(lambda inspector: inspector.delete_queue(name, force=force))
    out.print(f"queue {name} removed", markup=False)
    return 0


# ---------------------------------------------------------------------------- tasks
@admin.group("tasks", epilog=examples(
    'aqsh admin tasks ls --queue default --state archived',
    'aqsh admin tasks run-all --queue default --state archived',
    'aqsh admin tasks archive-all --queue default --state retry',
    'aqsh admin tasks delete-all --queue default --state completed',
))
def tasks_group() -> None:
    """Tasks of a queue in one state: list them, or run, archive or delete them all."""


def _bulk_op(op: str, past: str, help_text: str) -> None:
    @click.option("--queue", "qname", required=True, help="Queue name.")
    @click.option("--state", type=click.Choice([s for s in STATES if s != "active"]),
                  required=True, help="Task state.")
    @click.option("--group", default=None, help="Group (for aggregating tasks).")
    @pass_admin
    def command(ctx: AdminContext, qname: str, state: str, group: str | None) -> int:
        count: int = ctx.run(lambda inspector: getattr(inspector, f"{op}_all")(
            qname, TaskState(state), group=group))
        out.print(f"{count} {state} task(s) of queue {qname} {past}", markup=False)
        return 0

    command.__doc__ = help_text
    tasks_group.command(f"{op}-all")(command)


_bulk_op("run", "made pending", "Run every task of a queue in one state now.")
_bulk_op("archive", "archived", "Archive every waiting task of a queue in one state.")
_bulk_op("delete", "deleted", "Delete every task of a queue in one state.")


@tasks_group.command("ls")
@click.option("--queue", "qname", required=True, help="Queue name.")
@click.option("--state", type=click.Choice(STATES), required=True, help="Task state.")
@click.option("--group", default=None, help="Group (for aggregating tasks).")
@click.option("--page", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--size", "page_size", default=30, show_default=True,
              type=click.IntRange(1, 10_000), help="Tasks per page.")
@json_option
@pass_admin
def tasks_ls(ctx: AdminContext, qname: str, state: str, group: str | None, page: int,
             page_size: int, as_json: bool) -> int:
    """List a queue's tasks in one state (next to run first)."""
    listed: list[TaskInfo] = ctx.run(lambda inspector: inspector.list_tasks(
        qname, TaskState(state), page=page, page_size=page_size, group=group))
    if as_json:
        print_json([task_json(t) for t in listed])
        return 0
    table(["ID", "TYPE", "PAYLOAD", "RETRIED", "NEXT RUN", "LAST ERROR"], (
        (t.id, t.type, _short(_text(t.message.payload)), f"{t.message.retried}/{t.message.retry}",
         iso_from_unix(t.next_process_at_s) if state in ("scheduled", "retry") else None,
         _short(t.message.error_msg)) for t in listed))
    return 0


def _short(text: str | None, limit: int = 60) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


@admin.group("task", epilog=examples(
    'aqsh admin task inspect 2f1c…',
    'aqsh admin task run 2f1c… --queue default',
    'aqsh admin task archive 2f1c…',
    'aqsh admin task delete 2f1c… --queue default',
    'aqsh admin task cancel 2f1c…',
))
def task_group() -> None:
    """One task: inspect, run, archive, delete, cancel."""


def _locate(inspector: Any, task_id: str, qname: str | None) -> Awaitable[TaskInfo]:
    if qname:
        return inspector.task_info(qname, task_id)  # type: ignore[no-any-return]
    return inspector.find_task(task_id)  # type: ignore[no-any-return]


queue_option = click.option("--queue", "qname", default=None,
                            help="The task's queue (default: search every queue).")


@task_group.command("inspect")
@click.argument("task_id", metavar="ID")
@queue_option
@json_option
@pass_admin
def task_inspect(ctx: AdminContext, task_id: str, qname: str | None, as_json: bool) -> int:
    """Everything asynq stores about a task."""
    info: TaskInfo = ctx.run(lambda inspector: _locate(inspector, task_id, qname))
    data = task_json(info)
    if as_json:
        print_json(data)
        return 0
    pairs = [(k.replace("_", " "), state_text(v) if k == "state" else v)
             for k, v in data.items() if k != "payload_b64"]
    for key in ("last_failed_at", "deadline", "next_process_at", "completed_at"):
        index = [k for k, _ in pairs].index(key.replace("_", " "))
        pairs[index] = (pairs[index][0], iso_from_unix(data[key]))
    fields(pairs)
    return 0


def _task_op(op: str, past: str, help_text: str) -> click.Command:
    @click.argument("task_id", metavar="ID")
    @queue_option
    @pass_admin
    def command(ctx: AdminContext, task_id: str, qname: str | None) -> int:
        async def act(inspector: Any) -> str:
            queue_name = qname or (await inspector.find_task(task_id)).queue
            await getattr(inspector, f"{op}_task")(queue_name, task_id)
            return str(queue_name)

        queue_name = ctx.run(act)
        out.print(f"task {task_id} ({queue_name}) {past}", markup=False)
        return 0

    command.__doc__ = help_text
    return task_group.command(op)(command)


_task_op("run", "is pending", "Run a scheduled, retry, archived or completed task now.")
_task_op("archive", "archived", "Archive a waiting task (pending, scheduled, retry).")
_task_op("delete", "deleted", "Delete a task that is not running.")


@task_group.command("cancel")
@click.argument("task_id", metavar="ID")
@pass_admin
def task_cancel(ctx: AdminContext, task_id: str) -> int:
    """Ask the worker running a task to stop it (asynq's cancelation signal)."""
    ctx.run(lambda inspector: inspector.cancel_processing(task_id))
    out.print(f"cancelation of task {task_id} requested", markup=False)
    return 0


# ---------------------------------------------------------------------------- servers, cron
@admin.command(epilog=examples(
    'aqsh admin servers',
    "aqsh admin servers --json | jq '.[].workers | length'",
))
@json_option
@pass_admin
def servers(ctx: AdminContext, as_json: bool) -> int:
    """Live worker servers (aqsh and Go) and the tasks each is running."""
    statuses: list[ServerStatus] = ctx.run(lambda inspector: inspector.servers())
    data = [server_json(s) for s in statuses]
    if as_json:
        print_json(data)
        return 0
    table(["HOST", "PID", "ID", "STATUS", "CONCURRENCY", "QUEUES", "BUSY", "STARTED"], (
        (s["host"], s["pid"], s["id"], s["status"], s["concurrency"],
         " ".join(f"{q}:{w}" for q, w in sorted(s["queues"].items())),
         len(s["workers"]), iso_from_unix(s["started"])) for s in data))
    running = [(s["host"], s["pid"], w) for s in data for w in s["workers"]]
    if running:
        out.print()
        table(["HOST", "PID", "TASK", "TYPE", "QUEUE", "STARTED", "DEADLINE"], (
            (host, pid, w["task_id"], w["type"], w["queue"], iso_from_unix(w["started"]),
             iso_from_unix(w["deadline"])) for host, pid, w in running), title="Running")
    return 0


@admin.group(epilog=examples(
    'aqsh admin cron ls',
    'aqsh admin cron history <entry-id>',
))
def cron() -> None:
    """Periodic tasks announced by the live schedulers (aqsh and Go)."""


@cron.command("ls")
@json_option
@pass_admin
def cron_ls(ctx: AdminContext, as_json: bool) -> int:
    """Every scheduler entry: spec, task, next and previous fire time."""
    entries: list[SchedulerEntry] = ctx.run(lambda inspector: inspector.scheduler_entries())
    data = [entry_json(e) for e in entries]
    if as_json:
        print_json(data)
        return 0
    table(["ENTRY ID", "SPEC", "TYPE", "PAYLOAD", "OPTIONS", "NEXT", "PREVIOUS"], (
        (e["id"], e["spec"], e["type"], _short(e["payload"]), " ".join(e["options"]),
         iso_from_unix(e["next"]), iso_from_unix(e["prev"])) for e in data))
    return 0


@cron.command("history")
@click.argument("entry_ids", nargs=-1, required=True, metavar="ENTRY_ID...")
@click.option("--page", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--size", "page_size", default=30, show_default=True,
              type=click.IntRange(1, 10_000), help="Events per page.")
@json_option
@pass_admin
def cron_history(ctx: AdminContext, entry_ids: tuple[str, ...], page: int, page_size: int,
                 as_json: bool) -> int:
    """The enqueue history of scheduler entries, newest first."""

    async def collect(inspector: Any) -> dict[str, list[SchedulerEnqueueEvent]]:
        return {entry_id: await inspector.scheduler_events(entry_id, page=page,
                                                           page_size=page_size)
                for entry_id in entry_ids}

    history = ctx.run(collect)
    if as_json:
        print_json({entry_id: [event_json(e) for e in events]
                    for entry_id, events in history.items()})
        return 0
    for i, (entry_id, events) in enumerate(history.items()):
        if i:
            out.print()
        table(["TASK ID", "ENQUEUED AT"], ((e.task_id, iso_from_unix(
            e.enqueue_time_ns / 1e9)) for e in events), title=f"Entry {entry_id}")
    return 0


__all__ = ["admin"]
