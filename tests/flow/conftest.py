"""Fixtures of tests/api (the API service), tests/cli (a live ``aqsh serve``), tests/cluster
(a Redis Cluster) and tests/webhooks (aqsh with its notifier, a local receiver), for the
held-run tests."""

from tests.api.conftest import make_service
from tests.cli.conftest import live_service
from tests.cluster.conftest import cluster, cluster_settings, queues, redis_cluster
from tests.webhooks.conftest import make_hooks, receiver, secret

__all__ = ["cluster", "cluster_settings", "live_service", "make_hooks", "make_service",
           "queues", "receiver", "redis_cluster", "secret"]
