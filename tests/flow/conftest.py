"""Fixtures of tests/api (the API service) and tests/cli (a live ``aqsh serve``), for the
held-run tests."""

from tests.api.conftest import make_service
from tests.cli.conftest import live_service

__all__ = ["live_service", "make_service"]
