"""Fixtures of tests/api (the API service), tests/cli (a live ``aqsh serve``) and
tests/cluster (a Redis Cluster), for the held-run tests."""

from tests.api.conftest import make_service
from tests.cli.conftest import live_service
from tests.cluster.conftest import cluster, cluster_settings, queues, redis_cluster

__all__ = ["cluster", "cluster_settings", "live_service", "make_service", "queues",
           "redis_cluster"]
