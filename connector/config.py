"""Configuration: one frozen object, from a YAML file plus ``TANDEM_*`` environment variables.

Environment variables win over the file, so a Helm chart can ship one ConfigMap and set the
member id per pod (``TANDEM_MEMBER_ID``). Nested fields use ``__``:
``TANDEM_SOURCE__BOOTSTRAP_SERVERS``. A bad value raises ConfigError naming every bad field,
before anything connects.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connector.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClusterConfig(_Frozen):
    """How to reach one Kafka cluster. Security options pass through to both clients."""

    bootstrap_servers: str = Field(min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _sasl_complete(self) -> ClusterConfig:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                "sasl_username and sasl_password"
            )
        return self

    def confluent(self) -> dict[str, Any]:
        """librdkafka properties for confluent-kafka clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else ""
            )
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = str(self.ssl_certfile)
        if self.ssl_keyfile:
            conf["ssl.key.location"] = str(self.ssl_keyfile)
        return conf

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return kwargs


class SourceConfig(ClusterConfig):
    topics: list[str] = []
    topic_regex: str | None = None
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    start_from: Literal["earliest", "latest"] = "earliest"
    max_unsecured_records: int = Field(
        default=100_000,
        ge=1,
        description="updates one worker holds as owner before it stops reading the primary "
        "until a set commits (backpressure: memory stays bounded when sets stall)",
    )
    metadata_max_age_ms: int = Field(
        default=30_000,
        ge=500,
        description="how often the group's consumer refreshes metadata: how soon a new "
        "topic matching topic_regex, a deleted topic or added partitions are noticed",
    )
    static_membership: bool = Field(
        default=False,
        description="join with group.instance.id = member_id, so a restarted pod takes its "
        "place back without a rebalance (Kafka >= 2.3; the embedded broker ignores it)",
    )

    @model_validator(mode="after")
    def _topics_given(self) -> SourceConfig:
        if not self.topics and not self.topic_regex:
            raise ValueError("give source.topics or source.topic_regex")
        if self.topics and self.topic_regex:
            raise ValueError("give source.topics or source.topic_regex, not both")
        for t in self.topics:
            if not _NAME.match(t):
                raise ValueError(f"topic name {t!r} is not a valid Kafka topic name")
        if self.topic_regex:
            try:
                re.compile(self.topic_regex)
            except re.error as exc:
                raise ValueError(f"topic_regex {self.topic_regex!r}: {exc}") from exc
        return self


class BackupConfig(_Frozen):
    """The backup cluster; its bootstrap defaults to the source cluster's."""

    bootstrap_servers: str | None = None
    topic_prefix: str = Field(default="backup.", pattern=r"^[A-Za-z0-9._-]*$")
    replication_factor: int = Field(default=-1, description="-1: the broker's default")
    max_message_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1_048_588,
        description="largest batch Tandem writes to the backup cluster; set as "
        "max.message.bytes on the topics it creates. A mirror envelope carries a primary "
        "record plus up to mirror.batch_bytes of others, so this must exceed the primary's "
        "largest record by that much",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class WindowConfig(_Frozen):
    interval_s: float = Field(default=5.0, gt=0)
    grace_s: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _grace_within_interval(self) -> WindowConfig:
        if self.grace_s >= self.interval_s:
            raise ValueError(
                f"grace_s ({self.grace_s}) must be smaller than interval_s ({self.interval_s})"
            )
        return self


class MirrorConfig(_Frozen):
    max_workers: int = Field(
        default=32, ge=2, le=1024, description="slots, and partitions of <group>.mirror"
    )
    batch_records: int = Field(default=1000, ge=1)
    batch_bytes: int = Field(default=512 * 1024, ge=1024)
    retention_hours: float = Field(
        default=72,
        gt=0,
        description="how long <group>.mirror keeps copies; they matter only until secured",
    )
    memory_records: int = Field(
        default=100_000, ge=1, description="copies a mirror keeps in memory; beyond, positions"
    )


class HttpConfig(_Frozen):
    """The worker's HTTP endpoints: metrics and probes, and the guarded ingest/admin routes.

    Loopback by default, so a worker on a shared host exposes nothing until told to; the
    token, when set, is required as ``Authorization: Bearer <token>`` on ingest and admin
    routes only, because Prometheus and kubelet probes must reach the rest without secrets.
    """

    listen: str | None = Field(default="127.0.0.1:0", description="host:port; null disables")
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _listen_parses(self) -> HttpConfig:
        if self.listen is not None:
            self.address  # noqa: B018 - parsed once here so a bad value fails at load time
        return self

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` as (host, port); ``[::1]:8080`` and ``0.0.0.0:8080`` both work."""
        assert self.listen is not None
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen {self.listen!r} must be host:port, e.g. 0.0.0.0:8080")
        return host.strip("[]"), int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TANDEM_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    group: str = Field(default="tandem", pattern=_NAME.pattern)
    member_id: str = Field(default_factory=socket.gethostname, pattern=_NAME.pattern)
    source: SourceConfig
    backup: BackupConfig = BackupConfig()
    window: WindowConfig = WindowConfig()
    mirror: MirrorConfig = MirrorConfig()
    http: HttpConfig = HttpConfig()
    announce_interval_s: float = Field(default=1.0, gt=0)
    checkpoint_groups: list[Annotated[str, Field(pattern=_NAME.pattern)]] = Field(
        default=[],
        description="application consumer groups on the primary whose committed offsets each "
        "manifest records, so that restore can translate them",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _backup_usable(self) -> Settings:
        b = self.backup
        security = [k for k in ClusterConfig.model_fields if k != "bootstrap_servers"]
        if b.bootstrap_servers is None and any(getattr(b, k) is not None for k in security):
            raise ValueError(
                "backup security options need backup.bootstrap_servers; without it the "
                "backup cluster is the source cluster and uses source's security options"
            )
        try:
            self.backup_cluster  # noqa: B018 - built once here so a bad backup fails early
        except ValidationError as exc:
            raise ValueError("backup: " + _describe(exc).split(":", 1)[1].strip()) from exc
        return self

    @property
    def backup_cluster(self) -> ClusterConfig:
        """The backup cluster, inheriting the source's address and security when not given."""
        b = self.backup
        if b.bootstrap_servers is None:
            return ClusterConfig(**self.source.model_dump(include=set(ClusterConfig.model_fields)))
        fields = {k: getattr(b, k) for k in ClusterConfig.model_fields if getattr(b, k) is not None}
        return ClusterConfig(**fields)

    @property
    def subscription_pattern(self) -> str | None:
        """``source.topic_regex`` as the group subscribes with it (``re.match``).

        Whole topic names only, as a regex is read everywhere else (aiokafka matches a
        prefix); and on a shared cluster never Tandem's own backup and internal topics,
        which a broad regex would otherwise back up again, prefix upon prefix.
        """
        regex = self.source.topic_regex
        if regex is None:
            return None
        own = []
        if self.backup.bootstrap_servers in (None, self.source.bootstrap_servers):
            internal = "|".join(re.escape(t) for t in self.internal_topic_names)
            own = [f"(?:{internal})\\Z"]
            if self.backup.topic_prefix:
                own.append(re.escape(self.backup.topic_prefix))
        guard = f"(?!{'|'.join(own)})" if own else ""
        return f"{guard}(?:{regex})\\Z"

    @property
    def internal_topic_names(self) -> tuple[str, str, str]:
        return (self.mirror_topic, self.control_topic, self.sets_topic)

    def backup_producer(self) -> dict[str, Any]:
        """librdkafka properties of producers to the backup cluster, sized for its topics."""
        return {
            **self.backup_cluster.confluent(),
            "message.max.bytes": self.backup.max_message_bytes,
        }

    @property
    def backup_topic_config(self) -> tuple[tuple[str, str], ...]:
        """Topic configs every topic Tandem creates on the backup cluster gets."""
        return (("max.message.bytes", str(self.backup.max_message_bytes)),)

    @property
    def mirror_topic(self) -> str:
        return f"{self.group}.mirror"

    @property
    def control_topic(self) -> str:
        return f"{self.group}.control"

    @property
    def sets_topic(self) -> str:
        return f"{self.group}.sets"

    @property
    def ingest_topic(self) -> str:
        return f"{self.group}.ingest"

    def backup_topic(self, topic: str) -> str:
        return f"{self.backup.topic_prefix}{topic}"


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (optional), apply the environment, validate everything at once."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
