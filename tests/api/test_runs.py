"""GET /runs against a real app, a real Redis and (where runs must run) a real worker."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.api.runs import decode_cursor, encode_cursor
from aqsh.clock import ManualClock
from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.inspect import Inspector
from aqsh.engine.runindex import Cursor, RunIndex, RunIndexer, Source
from aqsh.engine.task import CONTEXT_CANCELED
from tests.api.conftest import Service, ServiceFactory
from tests.api.test_api import finished
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

ALICE = {"X-Forwarded-User": "alice", "X-Forwarded-Groups": "dev"}
BOB = {"X-Forwarded-User": "bob", "X-Forwarded-Groups": "dev"}
CAROL = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "ops"}
ADMIN = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "platform"}


async def submit(service: Service, task: str, body: dict[str, Any],
                 headers: dict[str, str], query: str = "") -> str:
    status, reply, _ = await service.request("POST", f"/tasks/{task}{query}", json=body,
                                             headers=headers)
    assert status == 202, reply
    return str(reply["id"])


async def runs(service: Service, query: str = "", headers: dict[str, str] | None = None
               ) -> dict[str, Any]:
    status, body, _ = await service.request(
        "GET", f"/runs{query}", headers=ADMIN if headers is None else headers)
    assert status == 200, body
    return dict(body)


async def all_pages(service: Service, query: str, headers: dict[str, str] | None = None,
                    ) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    sep = "&" if query else ""
    while True:
        suffix = f"{query}{sep}cursor={cursor}" if cursor else query
        body = await runs(service, f"?{suffix}" if suffix else "", headers)
        pages.append([r["id"] for r in body["runs"]])
        cursor = body["next"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


async def newest_first(redis: aioredis.Redis, queue: str, ids: list[str],
                       task: str) -> list[str]:
    """``ids`` in the order GET /runs must give: enqueue time (index score), then id,
    both descending."""
    key = keys.runs_index_key(queue, task)
    scores = {i: await redis.zscore(key, i) for i in ids}
    assert all(s is not None for s in scores.values()), "every submitted task is indexed"
    return sorted(ids, key=lambda i: (scores[i], i.encode()), reverse=True)


async def test_newest_first_with_each_item_as_get_task_shows_it(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    ids = [await submit(service, "echo", {"name": f"n{'a' * i}"}, ALICE) for i in range(5)]
    body = await runs(service)
    assert [r["id"] for r in body["runs"]] == await newest_first(redis, "default", ids, "echo")
    assert body["next"] is None
    for item in body["runs"]:
        status, single, _ = await service.request("GET", f"/tasks/{item['id']}", headers=ADMIN)
        assert status == 200
        assert item == single
    assert body["runs"][0]["submitted_by"] == "alice"
    assert body["runs"][0]["state"] == "pending"


async def test_filters_by_task_state_and_submitter(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    service = await make_service(admin_groups=("platform",))
    done = await submit(service, "echo", {"name": "done"}, ALICE)
    await finished(service, done, "completed")
    later = await submit(service, "echo", {"name": "later"}, BOB, "?process_in=1h")
    other = await submit(service, "result", {}, ALICE, "?process_in=1h")

    async def ids(query: str) -> list[str]:
        return [r["id"] for r in (await runs(service, query))["runs"]]

    assert set(await ids("")) == {done, later, other}
    assert await ids("?task=echo") == [later, done]
    assert await ids("?task=result") == [other]
    assert await ids("?task=nope") == []
    assert await ids("?state=completed") == [done]
    assert await ids("?state=scheduled&task=echo") == [later]
    assert await ids("?submitted_by=bob") == [later]
    assert set(await ids("?submitted_by=alice")) == {done, other}
    assert await ids("?submitted_by=alice&state=scheduled") == [other]
    assert await ids("?submitted_by=nobody") == []


async def test_time_range_bounds_the_enqueue_time(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    first = await submit(service, "echo", {"name": "a"}, ALICE)
    second = await submit(service, "echo", {"name": "b"}, ALICE)
    key = keys.runs_index_key("default", "echo")
    # Move the first run a day back, as if it had been enqueued then.
    day_ms = 86_400_000
    old_ms = int(await redis.zscore(key, first) or 0) - day_ms
    await redis.zadd(key, {first: old_ms})

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")

    boundary = iso(old_ms + day_ms // 2)
    assert [r["id"] for r in (await runs(service, f"?since={boundary}"))["runs"]] == [second]
    assert [r["id"] for r in (await runs(service, f"?until={boundary}"))["runs"]] == [first]
    both = await runs(service, f"?since={iso(old_ms)}&until={iso(old_ms + 2 * day_ms)}")
    assert [r["id"] for r in both["runs"]] == [second, first]


async def test_pages_cover_every_run_once_even_when_enqueue_times_tie(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    # One batch: every task of it has the same enqueue time, so the order within it is the
    # ids' order, and a cursor must resume in the middle of a tie.
    results = await service.state.client.enqueue_many(
        [EnqueueRequest(type="lines", payload=b"{}", headers={"aqsh-allowed-groups": "[]"})
         for _ in range(23)])
    batch_ids = [r.id for r in results if not isinstance(r, Exception)]
    single = [await submit(service, "echo", {"name": "x"}, ALICE) for _ in range(4)]
    assert len({await redis.zscore(keys.runs_index_key("default", "lines"), i)
                for i in batch_ids}) == 1
    pages = await all_pages(service, "limit=5")
    assert all(len(p) == 5 for p in pages[:-1])
    flat = [i for p in pages for i in p]
    assert len(flat) == len(set(flat)) == 27
    assert set(flat) == {*batch_ids, *single}
    # Within one index the order is exactly the index's (score, then id, descending).
    in_lines = [i for i in flat if i in batch_ids]
    assert in_lines == await newest_first(redis, "default", batch_ids, "lines")
    # A task filter pages through one index, resuming inside the tie by rank.
    tie_pages = await all_pages(service, "task=lines&limit=4")
    assert [i for p in tie_pages for i in p] == in_lines


async def test_runs_are_listed_only_to_callers_who_may_see_them(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    secret = await submit(service, "secret", {"name": "s"}, CAROL)
    public = await submit(service, "echo", {"name": "p"}, ALICE)

    async def ids(headers: dict[str, str], query: str = "") -> set[str]:
        return {r["id"] for r in (await runs(service, query, headers))["runs"]}

    assert await ids(ALICE) == {public}
    assert await ids(ALICE, "?task=secret") == set()
    assert await ids(CAROL) == {secret, public}
    assert await ids(ADMIN) == {secret, public}
    assert await ids({}) == {public}  # anonymous: only open tasks


async def test_go_enqueued_tasks_are_indexed_for_admins_only(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    # Exactly what asynq's Go client writes: the task without an index entry or access record,
    # one of a configured type and one of a type aqsh does not know.
    go = Client(redis, index_runs=False)
    known = await go.enqueue("echo", b'{"name": "go"}')
    foreign = await go.enqueue("email:send", b"{}", queue="mail")
    scheduled = await go.enqueue("email:send", b"{}", queue="mail", process_in=3600)
    # The app's own indexer may get there first: either way, after one pass all are in.
    await RunIndexer(redis, known=lambda: [Source("default", "echo")]).run_once()
    admin = {r["id"] for r in (await runs(service, "", ADMIN))["runs"]}
    assert admin == {known.id, foreign.id, scheduled.id}
    assert (await runs(service, "?task=email:send", ADMIN))["runs"][0]["queue"] == "mail"
    assert (await runs(service, "", ALICE))["runs"] == []


async def test_the_indexer_adds_only_what_no_index_has(redis: aioredis.Redis) -> None:
    go = Client(redis, index_runs=False)
    pending = await go.enqueue("a", b"")
    scheduled = await go.enqueue("b", b"", queue="q2", process_in=3600)
    ours = await Client(redis).enqueue("a", b"")
    indexer = RunIndexer(redis, known=lambda: [Source("default", "a")])
    assert await indexer.run_once() == 2
    assert await indexer.run_once() == 0  # remembered: a pass costs only new tasks
    assert await RunIndexer(redis, known=list).run_once() == 0  # ZADD NX: a fresh one adds none
    assert await RunIndex(redis).sources() == {Source("default", "a"), Source("q2", "b")}
    key = keys.runs_index_key("default", "a")
    assert {m.decode() for m in await redis.zrange(key, 0, -1)} == {pending.id, ours.id}
    assert await redis.zscore(keys.runs_index_key("q2", "b"), scheduled.id) is not None


async def test_the_running_indexer_finds_go_tasks(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    task = await Client(redis, index_runs=False).enqueue("echo", b'{"name": "go"}')

    async def listed() -> bool:
        return task.id in {r["id"] for r in (await runs(service, "", ADMIN))["runs"]}

    await wait_until(listed, timeout_s=30, interval_s=0.1, message="the indexer's pass")


# These three run without a service: its indexer would heal the index before the reader does.
async def test_a_task_deleted_behind_aqsh_is_skipped_and_its_entry_removed(
    redis: aioredis.Redis,
) -> None:
    client = Client(redis)
    ids = [(await client.enqueue("echo", b"{}")).id for _ in range(3)]
    expected = [i for i in await newest_first(redis, "default", ids, "echo") if i != ids[1]]
    inspector = Inspector(redis)
    await inspector.delete_task("default", ids[1])  # as Asynqmon does
    key = keys.runs_index_key("default", "echo")
    assert await redis.zscore(key, ids[1]) is not None
    page = await RunIndex(redis).page([Source("default", "echo")], limit=10,
                                      accept=lambda run: True)
    assert [run.info.id for run in page.runs] == expected
    assert await redis.zscore(key, ids[1]) is None  # healed


async def test_enqueues_trim_entries_of_gone_tasks_from_the_old_end(
    redis: aioredis.Redis,
) -> None:
    """Enqueues in one millisecond of eight trim (ManualClock starts on a multiple of 8 ms),
    up to 16 entries each, from the old end, stopping at the first task that still exists."""
    clock = ManualClock()
    client = Client(redis, clock=clock)
    old = [(await client.enqueue("echo", b"{}")).id for _ in range(20)]
    key = keys.runs_index_key("default", "echo")
    for task_id in old[:18]:  # enqueued a while ago; their retention has ended since
        await redis.zincrby(key, -60_000, task_id)
        await redis.delete(keys.queue_keys("default").task(task_id))
    await client.enqueue("echo", b"{}")
    assert await redis.zcard(key) == 21 - 16
    clock.advance(0.001)  # a millisecond that does not trim
    await client.enqueue("echo", b"{}")
    assert await redis.zcard(key) == 22 - 16
    clock.advance(0.007)
    await client.enqueue("echo", b"{}", process_in=60)  # the schedule scripts trim too
    remaining = {m.decode() for m in await redis.zrange(key, 0, -1)}
    assert remaining.isdisjoint(old[:18])
    assert set(old[18:]) <= remaining
    assert len(remaining) == 5


async def test_the_indexer_sweeps_entries_of_gone_tasks_anywhere(
    redis: aioredis.Redis,
) -> None:
    client = Client(redis)
    ids = [(await client.enqueue("echo", b"{}")).id for _ in range(4)]
    await redis.delete(keys.queue_keys("default").task(ids[2]))  # in the middle
    indexer = RunIndexer(redis, known=lambda: [Source("default", "echo")])
    await indexer.run_once()
    key = keys.runs_index_key("default", "echo")
    assert {m.decode() for m in await redis.zrange(key, 0, -1)} == {ids[0], ids[1], ids[3]}


async def test_state_active_lists_what_runs_now(make_service: ServiceFactory) -> None:
    service = await make_service(admin_groups=("platform",))
    slow = [await submit(service, "slow", {}, ALICE) for _ in range(2)]
    quick = await submit(service, "echo", {"name": "q"}, ALICE)
    await finished(service, quick, "completed")

    async def active() -> list[str] | None:
        listed = [r["id"] for r in (await runs(service, "?state=active"))["runs"]]
        return listed if len(listed) == 2 else None

    listed = await wait_until(active, timeout_s=30, interval_s=0.05, message="both running")
    assert set(listed) == set(slow)
    first = await runs(service, "?state=active&limit=1")
    rest = await runs(service, f"?state=active&limit=1&cursor={first['next']}")
    assert [r["id"] for r in first["runs"] + rest["runs"]] == listed
    assert rest["next"] is None
    assert (await runs(service, "?state=active", BOB))["runs"] != []  # open tasks: visible
    for task_id in slow:
        await service.request("DELETE", f"/tasks/{task_id}", headers=ADMIN)


async def test_a_rare_filter_costs_a_bounded_page_and_says_where_to_go_on(
    redis: aioredis.Redis,
) -> None:
    client = Client(redis)
    await client.enqueue_many([EnqueueRequest(type="t", payload=b"") for _ in range(120)])
    index = RunIndex(redis)
    page = await index.page([Source("default", "t")], limit=10, accept=lambda run: False,
                            budget=50)
    assert page.runs == []
    assert page.next is not None
    pages = 1
    while page.next is not None:
        page = await index.page([Source("default", "t")], limit=10, accept=lambda run: False,
                                budget=50, cursor=page.next)
        pages += 1
    assert pages == 3  # 50 + 50 + 20 entries examined


@pytest.mark.parametrize("query", [
    "limit=0", "limit=201", "limit=ten", "state=running", "since=yesterday",
    "until=2026-01-01T00:00:00", "cursor=%%%", "cursor=bm90IGpzb24", "limit=5&limit=6",
    "task=",
])
async def test_bad_queries_are_400_in_the_error_envelope(
    make_service: ServiceFactory, query: str,
) -> None:
    service = await make_service(worker=False)
    status, body, _ = await service.request("GET", f"/runs?{query}")
    assert status == 400, body
    assert body["error"]["code"] in ("invalid_query", "invalid_cursor")


def test_cursor_round_trips() -> None:
    cursor = Cursor(1_733_000_000_123, "a/b{c}")
    assert decode_cursor(encode_cursor(cursor)) == cursor


async def test_canceled_is_a_state_of_its_own(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    canceled = await submit(service, "echo", {"name": "c"}, ALICE, "?process_in=1h")
    kept = await submit(service, "echo", {"name": "k"}, ALICE, "?process_in=1h")
    status, _, _ = await service.request("DELETE", f"/tasks/{canceled}", headers=ALICE)
    assert status == 200
    assert [r["id"] for r in (await runs(service, "?state=canceled"))["runs"]] == [canceled]
    assert (await runs(service, "?state=archived"))["runs"] == []
    assert [r["id"] for r in (await runs(service, "?state=scheduled"))["runs"]] == [kept]


async def test_anonymous_callers_are_refused_where_identity_is_required(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False, require_identity=True)
    status, body, _ = await service.request("GET", "/runs")
    assert status == 401
    assert body["error"]["code"] == "unauthenticated"
    assert (await runs(service, "", ALICE))["runs"] == []


async def test_a_cancel_that_beat_the_script_is_canceled_not_archived(
        make_service: ServiceFactory) -> None:
    """DELETE landing as a worker takes the task cancels its handler before the script starts:
    the engine archives it with asynq's "context canceled" and no result (seen in the soak as a
    409 "already finished (archived)" for a task that was canceled). It reads as canceled."""
    service = await make_service(worker=False, admin_groups=("platform",))
    task_id = await submit(service, "slow", {}, ALICE)
    broker = service.state.broker
    (taken,) = await broker.dequeue_many(["default"], limit=1, now_s=int(time.time()))
    await broker.archive(taken.message, error_msg=CONTEXT_CANCELED, now_s=int(time.time()))
    status, shown, _ = await service.request("GET", f"/tasks/{task_id}", headers=ALICE)
    assert status == 200
    assert shown["state"] == "canceled"
    assert [r["id"] for r in (await runs(service, "?state=canceled"))["runs"]] == [task_id]
    status, body, _ = await service.request("DELETE", f"/tasks/{task_id}", headers=ALICE)
    assert status == 409
    assert "canceled" in body["error"]["message"]
