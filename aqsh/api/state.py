"""What every handler needs, built once per app."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from aqsh.api.metrics import Metrics
from aqsh.config_holder import ConfigHolder
from aqsh.engine.client import Client
from aqsh.engine.connection import RedisClient
from aqsh.engine.inspect import Inspector
from aqsh.engine.rdb import RedisBroker
from aqsh.settings import Settings


@dataclass
class ApiState:
    settings: Settings
    config: ConfigHolder
    redis: RedisClient
    #: A separate pool for XREAD BLOCK: followers hold a connection each while they wait.
    blocking_redis: RedisClient
    broker: RedisBroker
    client: Client
    inspector: Inspector
    metrics: Metrics
    draining: bool = False


STATE_KEY = web.AppKey("aqsh", ApiState)
