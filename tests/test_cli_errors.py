"""Bad input at the command line: the real ``tandem`` process fails fast, says what is wrong,
and creates nothing.

Each test runs ``python -m connector`` as a subprocess, so exit codes and stderr are exactly
what an operator sees. Topics are checked by listing *all* topics: asking the broker for one
named topic auto-creates it on the embedded broker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient

UNREACHABLE = "127.0.0.1:1"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TANDEM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tandem(*args: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=Path(__file__).resolve().parent.parent,
    )
    return proc, time.monotonic() - started


def _flat(text: str) -> str:
    """stderr as one line: rich wraps long messages at the terminal width."""
    return " ".join(text.split())


def _config(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "tandem.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _all_topics(bootstrap: str) -> set[str]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15)
    return set(md.topics)


def _internal(group: str) -> set[str]:
    return {f"{group}.mirror", f"{group}.control", f"{group}.sets"}


# -- invalid configuration: exit 2, field named, nothing started ----------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"source": {"topics": ["a"]}}, "source.bootstrap_servers"),
        ({"source": {"bootstrap_servers": "BOOT"}}, "source.topic_regex"),
        (
            {"source": {"bootstrap_servers": "BOOT", "topics": ["a"]}, "window": {"grace_s": 9}},
            "grace_s",
        ),
        ({"source": {"bootstrap_servers": "BOOT", "topics": ["a"]}, "group": "a b"}, "group"),
        ({"source": {"bootstrap_servers": "BOOT", "topics": ["a"]}, "grup": "g"}, "grup"),
        (
            {
                "source": {
                    "bootstrap_servers": "BOOT",
                    "topics": ["a"],
                    "security_protocol": "SASL_SSL",
                }
            },
            "sasl_password",
        ),
    ],
    ids=["no-bootstrap", "no-topics", "grace", "group", "unknown-key", "sasl"],
)
def test_invalid_config_exits_2_naming_the_field(
    tmp_path: Path, bootstrap: str, unique: str, config: dict[str, Any], field: str
) -> None:
    group = f"cli-bad-{unique}"
    config = {"group": group, **config} if "group" not in config else config
    if "bootstrap_servers" in config["source"]:
        config["source"]["bootstrap_servers"] = bootstrap
    before = _all_topics(bootstrap)

    proc, elapsed = _tandem("worker", "--config", str(_config(tmp_path, config)))

    assert proc.returncode == 2, proc.stderr
    err = _flat(proc.stderr)
    assert "invalid configuration" in err
    assert field in err, err
    assert "Traceback" not in proc.stderr
    assert elapsed < 30
    # nothing started: no topic appeared on the broker it would have used
    assert _all_topics(bootstrap) - before == set()


@pytest.mark.parametrize("command", ["worker", "status"])
def test_missing_config_file_exits_2(tmp_path: Path, command: str) -> None:
    path = tmp_path / "does-not-exist.yaml"
    proc, _ = _tandem(command, "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert str(path) in _flat(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_non_mapping_config_exits_2(tmp_path: Path) -> None:
    path = _config(tmp_path, "- just\n- a list\n")
    proc, _ = _tandem("worker", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "mapping" in _flat(proc.stderr)


def test_config_error_with_markup_like_text_is_printed(tmp_path: Path) -> None:
    path = _config(tmp_path, {"source": {"bootstrap_servers": "k:1", "topic_regex": "[/x]("}})
    proc, _ = _tandem("worker", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "topic_regex" in _flat(proc.stderr)


def test_config_error_quotes_the_value_verbatim(tmp_path: Path) -> None:
    regex = "orders-[a-z]+("
    path = _config(tmp_path, {"source": {"bootstrap_servers": "k:1", "topic_regex": regex}})
    proc, _ = _tandem("worker", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert regex in _flat(proc.stderr)


# -- a primary topic that does not exist ------------------------------------------------------


def test_worker_with_missing_primary_topic(tmp_path: Path, bootstrap: str, unique: str) -> None:
    group = f"cli-missing-{unique}"
    topic = f"no-such-topic-{unique}"
    path = _config(
        tmp_path,
        {
            "group": group,
            "source": {"bootstrap_servers": bootstrap, "topics": [topic]},
            "http": {"listen": None},
        },
    )
    proc, elapsed = _tandem("worker", "--config", str(path), timeout=90)

    assert proc.returncode != 0
    err = _flat(proc.stderr)
    assert topic in err, err
    assert "Traceback" not in proc.stderr
    assert elapsed < 60
    topics = _all_topics(bootstrap)
    assert topic not in topics, "the worker created the primary topic it should only check"
    assert not (_internal(group) & topics), "internal topics created for a worker that failed"
    assert f"backup.{topic}" not in topics


def test_worker_names_only_the_missing_topic(
    tmp_path: Path, bootstrap: str, unique: str, make_topics: Callable[..., None]
) -> None:
    group = f"cli-partial-{unique}"
    present = f"present-{unique}"
    missing = f"absent-{unique}"
    make_topics(bootstrap, {present: 2})
    path = _config(
        tmp_path,
        {
            "group": group,
            "source": {"bootstrap_servers": bootstrap, "topics": [present, missing]},
            "http": {"listen": None},
        },
    )
    proc, _ = _tandem("worker", "--config", str(path), timeout=90)

    assert proc.returncode != 0
    err = _flat(proc.stderr)
    assert missing in err, err
    assert bootstrap in err
    topics = _all_topics(bootstrap)
    assert missing not in topics
    assert present in topics
    assert not (_internal(group) & topics)


# -- a broker that is not there ---------------------------------------------------------------


def test_worker_with_unreachable_broker(tmp_path: Path, unique: str) -> None:
    path = _config(
        tmp_path,
        {
            "group": f"cli-unreach-{unique}",
            "source": {"bootstrap_servers": UNREACHABLE, "topics": ["orders"]},
            "http": {"listen": None},
        },
    )
    try:
        proc, elapsed = _tandem("worker", "--config", str(path), timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("tandem worker hung on an unreachable broker for 90 s")

    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
    err = _flat(proc.stderr)
    assert UNREACHABLE in err, err
    assert "Traceback" not in proc.stderr


def test_worker_with_unreachable_backup_broker(
    tmp_path: Path, bootstrap: str, unique: str, make_topics: Callable[..., None]
) -> None:
    """The source is fine, the backup cluster is not: the error names the backup address."""
    topic = f"src-{unique}"
    make_topics(bootstrap, {topic: 1})
    path = _config(
        tmp_path,
        {
            "group": f"cli-unreach-bk-{unique}",
            "source": {"bootstrap_servers": bootstrap, "topics": [topic]},
            "backup": {"bootstrap_servers": UNREACHABLE},
            "http": {"listen": None},
        },
    )
    try:
        proc, elapsed = _tandem("worker", "--config", str(path), timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("tandem worker hung on an unreachable backup broker for 90 s")

    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
    assert UNREACHABLE in _flat(proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
