"""Shared fixtures: one broker per session, unique names per test, topics created for real.

Set KAFKA_BOOTSTRAP to run the suite against an existing cluster (e.g. Apache Kafka) instead
of the embedded Tansu broker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from connector.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def unique() -> str:
    """A short suffix so tests sharing one broker never share a topic or group."""
    return uuid.uuid4().hex[:10]


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    config: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> None:
    """Create topics and wait for them: producing before that would auto-create 4 partitions."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    configs = dict(config or {})
    new = [NewTopic(name, partitions, config=configs) for name, partitions in topics.items()]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    for future in futures.values():
        future.result(timeout=timeout)


@pytest.fixture
def make_topics() -> Callable[..., None]:
    """``make_topics(bootstrap, {name: partitions}, config=None)``; works on any cluster."""
    return create_topics
