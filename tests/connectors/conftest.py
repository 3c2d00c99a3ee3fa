"""Shared fixtures for the connector tests."""

import pytest
from connector_actors import free_port


@pytest.fixture
def port() -> int:
    return free_port()
