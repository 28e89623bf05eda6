"""The embedded broker answers, starts on a free port, stops completely, and runs twice over."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
from confluent_kafka.admin import AdminClient

from connector.broker import EmbeddedBroker
from connector.errors import BrokerUnavailable


def _topics(bootstrap: str) -> dict[str, int]:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_session_broker_answers(
    bootstrap: str, unique: str, make_topics: Callable[..., None]
) -> None:
    name = f"answers-{unique}"
    make_topics(bootstrap, {name: 3})
    assert _topics(bootstrap)[name] == 3


def test_embedded_broker_starts_on_free_port_and_stops() -> None:
    broker = EmbeddedBroker()
    with broker:
        pid = broker.pid
        assert pid is not None
        port = int(broker.bootstrap.rsplit(":", 1)[1])
        assert not _port_free(port)
        assert _topics(broker.bootstrap) == {}
    assert broker.pid is None
    assert _process_gone(pid)
    assert _port_free(port)
    broker.stop()  # idempotent


def test_stop_works_on_a_paused_broker() -> None:
    broker = EmbeddedBroker().start()
    pid = broker.pid
    assert pid is not None
    broker.pause()
    broker.resume()
    assert _topics(broker.bootstrap) == {}
    broker.pause()
    broker.stop()
    assert _process_gone(pid)


def test_two_brokers_run_at_once(unique: str, make_topics: Callable[..., None]) -> None:
    with EmbeddedBroker() as first, EmbeddedBroker() as second:
        assert first.bootstrap != second.bootstrap
        make_topics(first.bootstrap, {f"only-first-{unique}": 2})
        assert f"only-first-{unique}" in _topics(first.bootstrap)
        assert f"only-first-{unique}" not in _topics(second.bootstrap)


def test_taken_port_fails_fast_with_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="Address in use"):
            EmbeddedBroker(port).start(timeout=10)
        assert time.monotonic() - started < 5
