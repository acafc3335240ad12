"""Group aggregation, as asynq's server does it (protocol spec §4.20, §5.10).

Tasks enqueued with a group (``Client.enqueue(..., group=...)``, Go's ``asynq.Group``) wait in
``asynq:{q}:g:<group>`` in state ``aggregating``. A server with a ``GroupAggregator`` checks
every group of its queues every min(7 s, grace period): a group is due when it holds
``group_max_size`` tasks, when its oldest task has waited ``group_max_delay``, or when no task
joined it for ``group_grace_period``. Its due tasks move into an aggregation set, the aggregator
turns them into one task, that task is enqueued on the group's queue, and the set and its tasks
are deleted. A set that is not deleted within two minutes (its server died, the aggregator
raised, the enqueue failed) is given back to its group by the recoverer, so no task is lost.

A server without an aggregator leaves grouped tasks alone, as asynq does, but says so in the
log: tasks that wait for ever without a word are worse than a warning.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec
import structlog

from aqsh import errors
from aqsh.clock import Clock
from aqsh.engine.broker import Broker
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.faults import Loops
from aqsh.engine.maintenance import Periodic
from aqsh.engine.task import Task

log = structlog.get_logger("aqsh.engine")

#: Turns a group's tasks (oldest first) into the one task to enqueue instead. Its ``queue`` is
#: ignored: the aggregated task always goes to the group's queue (as in asynq). May be a
#: coroutine function.
GroupAggregator = Callable[[str, list[Task]], EnqueueRequest | Awaitable[EnqueueRequest]]

DEFAULT_GRACE_PERIOD_S = 60.0
MIN_GRACE_PERIOD_S = 1.0
#: asynq checks every min(7 s, grace period).
DEFAULT_CHECK_INTERVAL_S = 7.0
#: Without an aggregator the groups are only looked at to warn about them.
UNSERVED_CHECK_INTERVAL_S = 60.0
#: The same unserved groups are warned about again after this long.
UNSERVED_WARN_EVERY_S = 600.0


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """asynq's GroupGracePeriod / GroupMaxDelay / GroupMaxSize (0 = no limit)."""

    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    max_delay_s: float = 0.0
    max_size: int = 0

    def __post_init__(self) -> None:
        if self.grace_period_s < MIN_GRACE_PERIOD_S:
            raise ValueError(f"group grace period must be at least {MIN_GRACE_PERIOD_S:g} s, "
                             f"got {self.grace_period_s:g} s")
        if self.max_delay_s < 0:
            raise ValueError("group max delay must not be negative")
        if self.max_size < 0:
            raise ValueError("group max size must not be negative")


class Aggregator(Periodic):
    """The aggregation check loop. Each round looks at every group of every queue in turn; a
    failure in one group (Redis refusing, the aggregator raising) is logged and the others
    still run, and a Redis failure then fails the round so the loop's monitor shows it."""

    name = "aggregator"

    def __init__(self, broker: Broker, client: Client | None, queues: Sequence[str],
                 clock: Clock, aggregate: GroupAggregator | None,
                 settings: GroupSettings | None = None, *, interval_s: float | None = None,
                 loops: Loops | None = None,
                 group_settings: Callable[[str, str], GroupSettings | None] | None = None,
                 ) -> None:
        """``client`` enqueues the aggregated tasks; it is needed only with ``aggregate``.

        ``group_settings(queue, group)``: per-group settings instead of ``settings`` for all
        (asynq has one set per server; aqsh's shell tasks declare their own); None leaves
        that group to other servers, with the same warning as a server without aggregator.
        """
        if aggregate is not None and client is None:
            raise ValueError("a group aggregator needs a client to enqueue its tasks")
        self.settings = settings or GroupSettings()
        if interval_s is None:
            interval_s = (min(DEFAULT_CHECK_INTERVAL_S, self.settings.grace_period_s)
                          if aggregate is not None else UNSERVED_CHECK_INTERVAL_S)
        # asynq's first check waits an interval; the warning-only round may run at once.
        super().__init__(interval_s, run_first=aggregate is None, loops=loops)
        self.broker, self.client, self.clock = broker, client, clock
        self.queues = list(queues)
        self.aggregate = aggregate
        self.group_settings = group_settings
        self._warned: dict[str, tuple[frozenset[str], float]] = {}

    async def run_once(self) -> int:
        """Returns how many aggregated tasks were enqueued."""
        enqueued = 0
        first_fault: errors.AqshError | None = None
        for qname in self.queues:
            unserved: set[str] = set()
            for group in await self.broker.list_groups(qname):
                settings = self._settings_for(qname, group)
                if settings is None:
                    unserved.add(group)
                    continue
                try:
                    enqueued += await self._check(qname, group, settings)
                except (errors.BrokerUnavailable, errors.BrokerFault) as exc:
                    log.warning("group.check_failed", queue=qname, group=group, error=str(exc))
                    first_fault = first_fault or exc
            self._warn_unserved(qname, frozenset(unserved))
        if first_fault is not None:
            raise first_fault
        return enqueued

    def _settings_for(self, qname: str, group: str) -> GroupSettings | None:
        if self.aggregate is None:
            return None
        if self.group_settings is None:
            return self.settings
        return self.group_settings(qname, group)

    async def _check(self, qname: str, group: str, settings: GroupSettings) -> int:
        assert self.aggregate is not None
        assert self.client is not None
        set_id = await self.broker.aggregation_check(
            qname, group, now_s=int(self.clock.now_s()),
            grace_period_s=int(settings.grace_period_s), max_delay_s=int(settings.max_delay_s),
            max_size=settings.max_size)
        if set_id is None:
            return 0
        msgs, deadline_s = await self.broker.read_aggregation_set(qname, group, set_id)
        bound = log.bind(queue=qname, group=group, set_id=set_id)
        if deadline_s == 0:
            # Reclaimed meanwhile (a stalled round): the tasks are back in their group.
            bound.warning("group.set_vanished")
            return 0
        if not msgs:  # every task of it was deleted meanwhile (an Inspector): nothing to run
            await self.broker.delete_aggregation_set(qname, group, set_id)
            return 0
        tasks = [Task(id=m.id, type=m.type, payload=m.payload, queue=m.queue,
                      headers=m.headers, retried=m.retried, max_retry=m.retry) for m in msgs]
        try:
            made = self.aggregate(group, tasks)
            request = await made if inspect.isawaitable(made) else made
            if not isinstance(request, EnqueueRequest):
                raise TypeError(f"the group aggregator returned {type(request).__name__}, "
                                "not an EnqueueRequest")
            request = msgspec.structs.replace(request, queue=qname)
            # Given up at the set's deadline (asynq's context deadline): past it the recoverer
            # may give the tasks back to the group, and they would run a second time.
            remaining_s = deadline_s - self.clock.now_s()
            async with asyncio.timeout(max(0.0, remaining_s)):
                info = await self.client.enqueue_many([request])
        except (errors.BrokerUnavailable, errors.BrokerFault):
            raise
        except Exception as exc:  # the user's aggregator, or an enqueue refused
            bound.error("group.aggregate_failed", tasks=len(tasks),
                        error=f"{type(exc).__name__}: {exc}")
            return 0
        outcome = info[0]
        if isinstance(outcome, errors.AqshError):  # a duplicate (unique) or an id conflict
            bound.error("group.aggregate_failed", tasks=len(tasks), error=str(outcome))
            return 0
        await self.broker.delete_aggregation_set(qname, group, set_id)
        bound.info("group.aggregated", tasks=len(tasks), task_id=outcome.id,
                   type=outcome.type)
        return 1

    def _warn_unserved(self, qname: str, groups: frozenset[str]) -> None:
        """Once per new group, and again every UNSERVED_WARN_EVERY_S while they wait."""
        if not groups:
            self._warned.pop(qname, None)
            return
        now = time.monotonic()
        previous = self._warned.get(qname)
        if previous is not None and previous[0] >= groups \
                and now - previous[1] < UNSERVED_WARN_EVERY_S:
            return
        self._warned[qname] = (groups, now)
        log.warning("group.no_aggregator", queue=qname, groups=sorted(groups),
                    hint="tasks enqueued with a group wait in state aggregating until a "
                         "server with a group aggregator for them serves this queue")
