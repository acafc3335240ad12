"""The API service fixture of tests/api, for the held-run API tests."""

from tests.api.conftest import make_service

__all__ = ["make_service"]
