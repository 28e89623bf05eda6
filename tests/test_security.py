"""Security options reach the Kafka clients, and secrets never reach a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from connector.config import load_settings
from connector.errors import BrokerUnavailable
from connector.fleet import write_config
from connector.mirror import MirrorStore
from connector.reader import standalone_consumer

PASSWORD = "PW-never-logged-7f3a"
TOKEN = "TOK-never-logged-91bc"


class Refused(Exception):
    pass


class RecordingConsumer:
    """Stands in for AIOKafkaConsumer: keeps its arguments and refuses to connect."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, *topics: str, **kwargs: Any) -> None:
        RecordingConsumer.seen.append(kwargs)

    async def start(self) -> None:
        raise Refused

    async def stop(self) -> None:
        return None


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    RecordingConsumer.seen = []
    monkeypatch.setattr("connector.reader.AIOKafkaConsumer", RecordingConsumer)
    monkeypatch.setattr("connector.mirror.AIOKafkaConsumer", RecordingConsumer)
    return RecordingConsumer.seen


async def test_readers_and_the_mirror_store_get_the_backup_clusters_security(
    recorder: list[dict[str, Any]],
) -> None:
    s = load_settings(
        None,
        source={"bootstrap_servers": "src:9092", "topics": ["t"]},
        backup={
            "bootstrap_servers": "dr:9093",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": "dr-user",
            "sasl_password": PASSWORD,
        },
    )
    client = s.backup_cluster.aiokafka()
    with pytest.raises(BrokerUnavailable) as info:
        async with standalone_consumer(client):
            pass
    assert PASSWORD not in str(info.value)
    with pytest.raises(Refused):
        await MirrorStore(client, topic=s.mirror_topic, member="w0").run(0)
    assert len(recorder) == 2
    for kwargs in recorder:
        assert kwargs["bootstrap_servers"] == "dr:9093"
        assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
        assert kwargs["sasl_plain_username"] == "dr-user"
        assert kwargs["sasl_plain_password"] == PASSWORD


@pytest.mark.slow
def test_a_worker_with_sasl_never_logs_its_password_or_token(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    """The embedded broker refuses the SASL handshake: the worker fails, loudly but cleanly."""
    topic = f"sec-{unique}"
    make_topics(bootstrap, {topic: 1})
    config = write_config(
        tmp_path / "sasl.yaml",
        {
            "group": f"sec-{unique}",
            "source": {
                "bootstrap_servers": bootstrap,
                "topics": [topic],
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "svc",
                "sasl_password": PASSWORD,
            },
            "http": {"listen": "127.0.0.1:0", "token": TOKEN},
        },
    )
    result = subprocess.run(
        [sys.executable, "-m", "connector", "worker", "-c", str(config), "--log-level", "DEBUG"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-2000:]
    assert f"cannot reach Kafka at {bootstrap}" in out
    assert "sasl_plaintext://" in out  # librdkafka did speak SASL: the option reached it
    assert PASSWORD not in out and TOKEN not in out
