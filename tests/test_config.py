"""Configuration: YAML plus TANDEM_* environment, env wins, and every error names its field."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.config import ClusterConfig, Settings, load_settings
from connector.errors import ConfigError
from connector.groupconfig import differences, group_config

PASSWORD = "s3cr3t-hunter2-pw"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TANDEM_* variable of the calling shell may leak into a test."""
    for name in list(os.environ):
        if name.upper().startswith("TANDEM_"):
            monkeypatch.delenv(name)


def _yaml(tmp_path: Path, data: Any, name: str = "tandem.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _minimal(**extra: Any) -> dict[str, Any]:
    return {"source": {"bootstrap_servers": "kafka:9092", "topics": ["orders"]}, **extra}


def _error(path: Path | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **overrides)
    return str(info.value)


# -- defaults and precedence -----------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(_yaml(tmp_path, _minimal()))
    assert s.group == "tandem"
    assert s.member_id == socket.gethostname()
    assert s.source.bootstrap_servers == "kafka:9092"
    assert s.source.topics == ["orders"]
    assert s.source.topic_regex is None
    assert s.source.security_protocol == "PLAINTEXT"
    assert s.source.start_from == "earliest"
    assert s.source.session_timeout_ms == 10_000
    assert s.backup.topic_prefix == "backup."
    assert s.backup.bootstrap_servers is None
    assert s.window.interval_s == 5.0
    assert s.window.grace_s == 1.0
    assert s.mirror.max_workers == 32
    assert s.http.listen == "127.0.0.1:0"
    assert s.announce_interval_s == 1.0
    # derived names
    assert s.mirror_topic == "tandem.mirror"
    assert s.control_topic == "tandem.control"
    assert s.sets_topic == "tandem.sets"
    assert s.backup_topic("orders") == "backup.orders"
    # the backup cluster defaults to the source cluster
    assert s.backup_cluster.bootstrap_servers == "kafka:9092"
    assert s.backup_cluster.confluent() == s.source.confluent()


def test_yaml_values_are_used(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        _minimal(
            group="g1",
            member_id="w-7",
            backup={"bootstrap_servers": "backup:9092", "topic_prefix": "bk_"},
            window={"interval_s": 10, "grace_s": 2.5},
            http={"listen": None},
        ),
    )
    s = load_settings(path)
    assert (s.group, s.member_id) == ("g1", "w-7")
    assert s.backup_cluster.bootstrap_servers == "backup:9092"
    assert s.backup_topic("orders") == "bk_orders"
    assert (s.window.interval_s, s.window.grace_s) == (10.0, 2.5)
    assert s.http.listen is None


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(_yaml(tmp_path, _minimal()))
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
        s.group = "other"  # type: ignore[misc]
    with pytest.raises(Exception):  # noqa: B017
        s.window.grace_s = 0.1  # type: ignore[misc]


def test_env_wins_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _yaml(
        tmp_path, _minimal(group="from-yaml", member_id="yaml-member", window={"interval_s": 10})
    )
    monkeypatch.setenv("TANDEM_GROUP", "from-env")
    monkeypatch.setenv("TANDEM_MEMBER_ID", "pod-3")
    monkeypatch.setenv("TANDEM_SOURCE__BOOTSTRAP_SERVERS", "env-kafka:19092")
    monkeypatch.setenv("TANDEM_WINDOW__GRACE_S", "7.5")
    s = load_settings(path)
    assert s.group == "from-env"
    assert s.member_id == "pod-3"
    assert s.source.bootstrap_servers == "env-kafka:19092"
    # nested env values merge into the YAML section instead of replacing it
    assert s.source.topics == ["orders"]
    assert s.window.grace_s == 7.5
    assert s.window.interval_s == 10.0
    assert s.backup_cluster.bootstrap_servers == "env-kafka:19092"


def test_env_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_SOURCE__BOOTSTRAP_SERVERS", "k:1")
    monkeypatch.setenv("TANDEM_SOURCE__TOPICS", '["a", "b"]')
    s = load_settings(None)
    assert s.source.bootstrap_servers == "k:1"
    assert s.source.topics == ["a", "b"]


def test_env_wins_over_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_GROUP", "from-env")
    s = load_settings(_yaml(tmp_path, _minimal(group="from-yaml")), group="from-override")
    assert s.group == "from-env"


def test_overrides_win_over_yaml(tmp_path: Path) -> None:
    s = load_settings(_yaml(tmp_path, _minimal(group="from-yaml")), group="from-override")
    assert s.group == "from-override"


def test_env_value_is_validated_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_WINDOW__GRACE_S", "9")  # >= default interval 5
    msg = _error(_yaml(tmp_path, _minimal()))
    assert "window" in msg and "grace_s" in msg and "interval_s" in msg


def test_empty_yaml_file_means_no_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_SOURCE__BOOTSTRAP_SERVERS", "k:1")
    monkeypatch.setenv("TANDEM_SOURCE__TOPIC_REGEX", "orders-.*")
    s = load_settings(_yaml(tmp_path, ""))
    assert s.source.topic_regex == "orders-.*"


# -- validation errors name the field ----------------------------------------------------------


def test_missing_bootstrap_servers(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, {"source": {"topics": ["orders"]}}))
    assert "source.bootstrap_servers" in msg


def test_missing_source_section(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, {"group": "g"}))
    assert "source" in msg


def test_empty_bootstrap_servers(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, {"source": {"bootstrap_servers": "", "topics": ["a"]}}))
    assert "source.bootstrap_servers" in msg


def test_both_topics_and_regex(tmp_path: Path) -> None:
    src = {"bootstrap_servers": "k:1", "topics": ["a"], "topic_regex": "a.*"}
    msg = _error(_yaml(tmp_path, {"source": src}))
    assert "source" in msg and "topics" in msg and "topic_regex" in msg
    assert "not both" in msg


def test_neither_topics_nor_regex(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, {"source": {"bootstrap_servers": "k:1"}}))
    assert "source.topics" in msg and "source.topic_regex" in msg


def test_empty_topic_list_counts_as_none(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, {"source": {"bootstrap_servers": "k:1", "topics": []}}))
    assert "source.topics" in msg


def test_bad_regex(tmp_path: Path) -> None:
    src = {"bootstrap_servers": "k:1", "topic_regex": "orders-(.*"}
    msg = _error(_yaml(tmp_path, {"source": src}))
    assert "topic_regex" in msg and "orders-(.*" in msg


def test_bad_topic_name(tmp_path: Path) -> None:
    src = {"bootstrap_servers": "k:1", "topics": ["ok", "not ok!"]}
    msg = _error(_yaml(tmp_path, {"source": src}))
    assert "not ok!" in msg


@pytest.mark.parametrize(("interval", "grace"), [(5, 5), (5, 6), (0.5, 1.0)])
def test_grace_not_below_interval(tmp_path: Path, interval: float, grace: float) -> None:
    msg = _error(_yaml(tmp_path, _minimal(window={"interval_s": interval, "grace_s": grace})))
    assert "window" in msg and "grace_s" in msg and "interval_s" in msg


def test_grace_below_interval_is_fine(tmp_path: Path) -> None:
    s = load_settings(_yaml(tmp_path, _minimal(window={"interval_s": 5, "grace_s": 4.99})))
    assert s.window.grace_s == 4.99


@pytest.mark.parametrize("group", ["has space", "slash/no", "colon:no", "ünïcode", ""])
def test_bad_group_name(tmp_path: Path, group: str) -> None:
    msg = _error(_yaml(tmp_path, _minimal(group=group)))
    assert "group" in msg


def test_bad_member_id(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, _minimal(member_id="pod 3")))
    assert "member_id" in msg


@pytest.mark.parametrize(
    "sasl",
    [
        {},
        {"sasl_mechanism": "PLAIN"},
        {"sasl_mechanism": "PLAIN", "sasl_username": "u"},
        {"sasl_username": "u", "sasl_password": PASSWORD},
    ],
    ids=["nothing", "no-user", "no-password", "no-mechanism"],
)
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_without_credentials(tmp_path: Path, protocol: str, sasl: dict[str, str]) -> None:
    src = {"bootstrap_servers": "k:1", "topics": ["a"], "security_protocol": protocol, **sasl}
    msg = _error(_yaml(tmp_path, {"source": src}))
    assert "source" in msg and protocol in msg
    assert "sasl_username" in msg and "sasl_password" in msg
    assert PASSWORD not in msg


def test_unknown_security_protocol(tmp_path: Path) -> None:
    src = {"bootstrap_servers": "k:1", "topics": ["a"], "security_protocol": "KERBEROS"}
    msg = _error(_yaml(tmp_path, {"source": src}))
    assert "source.security_protocol" in msg


def test_backup_sasl_without_credentials_fails_at_load(tmp_path: Path) -> None:
    backup = {"bootstrap_servers": "bk:1", "security_protocol": "SASL_SSL"}
    path = _yaml(tmp_path, _minimal(backup=backup))
    with pytest.raises(ConfigError, match="backup"):
        s = load_settings(path)
        s.backup_cluster  # noqa: B018 - where it fails today


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = _error(_yaml(tmp_path, _minimal(windw={"interval_s": 3})))
    assert "windw" in msg


@pytest.mark.parametrize("section", ["source", "backup", "window", "mirror", "http"])
def test_unknown_nested_key(tmp_path: Path, section: str) -> None:
    data = _minimal()
    data.setdefault(section, {})["bogus_key"] = 1
    msg = _error(_yaml(tmp_path, data))
    assert f"{section}.bogus_key" in msg


def test_unknown_nested_env_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_WINDOW__GRACE", "1")  # typo of GRACE_S
    msg = _error(_yaml(tmp_path, _minimal()))
    assert "window.grace" in msg


def test_every_bad_field_is_named_at_once(tmp_path: Path) -> None:
    data = {
        "group": "bad group",
        "source": {"topics": ["a"]},
        "window": {"interval_s": 1, "grace_s": 2},
        "mirror": {"max_workers": 1},
        "extra_thing": True,
    }
    msg = _error(_yaml(tmp_path, data))
    for field in ("group", "source.bootstrap_servers", "window", "mirror.max_workers"):
        assert field in msg, field
    assert "extra_thing" in msg


@pytest.mark.parametrize("content", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, content: str) -> None:
    path = _yaml(tmp_path, content)
    msg = _error(path)
    assert str(path) in msg and "mapping" in msg


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "source: {bootstrap_servers: [unclosed\n")
    msg = _error(path)
    assert str(path) in msg and "YAML" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    msg = _error(path)
    assert str(path) in msg


def test_directory_instead_of_file(tmp_path: Path) -> None:
    msg = _error(tmp_path)
    assert str(tmp_path) in msg


# -- secrets -----------------------------------------------------------------------------------


def _sasl_settings(tmp_path: Path, **extra: Any) -> Settings:
    src = {
        "bootstrap_servers": "k:1",
        "topics": ["a"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "tandem",
        "sasl_password": PASSWORD,
    }
    return load_settings(_yaml(tmp_path, {"source": src, **extra}))


def test_password_never_printed(tmp_path: Path) -> None:
    s = _sasl_settings(tmp_path)
    for text in (
        str(s),
        repr(s),
        str(s.source),
        repr(s.source),
        str(s.backup_cluster),
        repr(s.backup_cluster),
        s.model_dump_json(),
        str(s.model_dump()),
        f"{s}",
    ):
        assert PASSWORD not in text


def test_password_reaches_the_clients(tmp_path: Path) -> None:
    s = _sasl_settings(tmp_path)
    assert s.source.confluent()["sasl.password"] == PASSWORD
    assert s.source.aiokafka()["sasl_plain_password"] == PASSWORD
    # the backup cluster inherits the source's credentials when it has no address of its own
    assert s.backup_cluster.confluent()["sasl.password"] == PASSWORD


def test_password_from_env_not_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = {
        "bootstrap_servers": "k:1",
        "topics": ["a"],
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "u",
    }
    monkeypatch.setenv("TANDEM_SOURCE__SASL_PASSWORD", PASSWORD)
    s = load_settings(_yaml(tmp_path, {"source": src}))
    assert PASSWORD not in repr(s)
    assert s.source.confluent()["sasl.password"] == PASSWORD


def test_password_not_in_config_error(tmp_path: Path) -> None:
    """Another field is bad; the message must still not echo the password."""
    src: dict[str, Any] = {
        "bootstrap_servers": "k:1",
        "topics": ["a"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "u",
        "sasl_password": PASSWORD,
    }
    msg = _error(_yaml(tmp_path, {"source": src, "group": "bad group"}))
    assert "group" in msg
    assert PASSWORD not in msg
    # a password of the wrong type must not be echoed either
    src["sasl_password"] = {"nested": PASSWORD}
    msg = _error(_yaml(tmp_path, {"source": src}))
    assert "source.sasl_password" in msg
    assert PASSWORD not in msg


def test_cluster_config_repr_hides_password() -> None:
    c = ClusterConfig(
        bootstrap_servers="k:1",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password=PASSWORD,  # type: ignore[arg-type]
    )
    assert PASSWORD not in repr(c) and PASSWORD not in str(c)


def test_checkpoint_groups(tmp_path: Path) -> None:
    assert load_settings(_yaml(tmp_path, _minimal())).checkpoint_groups == []
    s = load_settings(_yaml(tmp_path, _minimal(checkpoint_groups=["billing", "audit-2"])))
    assert s.checkpoint_groups == ["billing", "audit-2"]
    assert "checkpoint_groups.1" in _error(**_minimal(checkpoint_groups=["ok", "not ok"]))


def test_internal_topics_bound_what_they_keep(tmp_path: Path) -> None:
    """The mirror topic forgets copies after a while; the control topic keeps the newest."""
    from connector.worker import internal_topics

    s = load_settings(
        None,
        source={"bootstrap_servers": "k:9092", "topics": ["t"]},
        mirror={"retention_hours": 2, "max_workers": 4},
    )
    specs = {spec.name: (spec.partitions, dict(spec.config)) for spec in internal_topics(s)}
    size = dict(s.backup_topic_config)
    assert specs[s.mirror_topic] == (4, {"retention.ms": str(2 * 3_600_000), **size})
    assert specs[s.control_topic] == (1, {"cleanup.policy": "compact", **size})
    assert specs[s.sets_topic] == (1, {"retention.ms": "-1", **size})


def test_group_config_differences_name_every_differing_shared_setting() -> None:
    base = {"group": "g", "source": {"bootstrap_servers": "x:1", "topics": ["b", "a"]}}
    first = group_config(load_settings(**base, member_id="w0"))
    same = group_config(load_settings(**base, member_id="w1", http={"listen": None}))
    assert differences(first, same) == []  # member, time and unshared settings don't count
    other = group_config(
        load_settings(
            **base,
            window={"interval_s": 2, "grace_s": 1},
            backup={"topic_prefix": "other."},
        )
    )
    got = differences(first, other)
    assert [d.split(":")[0] for d in got] == ["interval_ms", "topic_prefix"], got
    assert "5000 (group) vs 2000 (this worker)" in got[0]


def test_a_topic_regex_never_subscribes_to_tandems_own_topics_on_a_shared_cluster() -> None:
    shared = load_settings(
        group="g", source={"bootstrap_servers": "x:1", "topic_regex": ".*"}
    ).subscription_pattern
    assert shared is not None
    picks = [
        t
        for t in ("orders", "backup.orders", "g.sets", "g.mirror", "g.setsx")
        if re.match(shared, t)
    ]
    assert picks == ["orders", "g.setsx"]
    apart = load_settings(
        source={"bootstrap_servers": "x:1", "topic_regex": "ord.*s"},
        backup={"bootstrap_servers": "y:1"},
    ).subscription_pattern
    assert apart is not None
    assert [t for t in ("orders", "backup.orders", "orders-2") if re.match(apart, t)] == ["orders"]
