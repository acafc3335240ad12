"""What every handler needs, built once per app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from aqsh.api.auth import PeerTrust
from aqsh.api.loghub import LogHub
from aqsh.api.metrics import Metrics
from aqsh.config_holder import ConfigHolder
from aqsh.engine.client import Client
from aqsh.engine.connection import RedisClient
from aqsh.engine.faults import Loops
from aqsh.engine.inspect import Inspector
from aqsh.engine.rdb import RedisBroker
from aqsh.settings import Settings

if TYPE_CHECKING:
    from aqsh.webhooks.notifier import Notifier


@dataclass
class ApiState:
    settings: Settings
    config: ConfigHolder
    redis: RedisClient
    #: A separate pool for XREAD BLOCK (the log hub's, or each follower's on a Cluster).
    blocking_redis: RedisClient
    broker: RedisBroker
    client: Client
    inspector: Inspector
    metrics: Metrics
    draining: bool = False
    #: The shared reader of followed log streams (standalone Redis; None on a Cluster).
    log_hub: LogHub | None = None
    #: The process's supervised loops (worker, scheduler, log hub): what the probes report.
    loops: Loops = field(default_factory=Loops)
    #: Turns ended tasks into webhook deliveries (None: webhooks not wired, as in bare tests).
    notifier: Notifier | None = None
    #: Which peers' identity headers are believed (from settings.trusted_proxies).
    trust: PeerTrust = field(init=False)

    def __post_init__(self) -> None:
        self.trust = PeerTrust(self.settings.trusted_proxies)


STATE_KEY = web.AppKey("aqsh", ApiState)
