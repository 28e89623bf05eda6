"""The Helm chart, the compose file and the dashboard, checked offline.

The chart is linted and rendered by Helm's own Go code (helm-python-sdk ships it as a
library), every rendered manifest is validated against the Kubernetes schemas
(kubernetes-validate), and the config a pod would load is loaded by the real settings code.
No Docker engine is available, so docker-compose.yml is checked for its structure and for
every file and service it refers to.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from connector.config import load_settings
from connector.metrics import Metrics
from connector.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tandem"
DASHBOARD = CHART / "dashboards" / "tandem.json"
KUBE_VERSION = "1.30"

SECURE = {
    "replicaCount": 4,
    "source": {
        "bootstrapServers": "kafka-0.kafka:9093,kafka-1.kafka:9093",
        "topics": ["orders", "payments"],
        "securityProtocol": "SASL_SSL",
        "saslMechanism": "SCRAM-SHA-512",
        "sasl": {"existingSecret": "kafka-user"},
        "tls": {"existingSecret": "kafka-ca"},
    },
    "backup": {
        "bootstrapServers": "dr-kafka:9093",
        "securityProtocol": "SSL",
        "tls": {"existingSecret": "dr-mtls", "certKey": "tls.crt", "keyKey": "tls.key"},
    },
    "http": {"port": 9400, "token": {"existingSecret": "tandem-token"}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "grafanaDashboard": {"enabled": True},
    "podAntiAffinity": "hard",
}


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The chart's manifests by kind, as `helm install --dry-run` would produce them."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values or {}, name="prod", namespace="ops", is_install=True)
    docs: dict[str, dict[str, Any]] = {}
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = doc["kind"] if doc["kind"] not in docs else f"{doc['kind']}/{path}"
                docs[key] = doc
    return docs


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c["env"]}


def test_chart_lints_clean() -> None:
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [{}, SECURE], ids=["defaults", "secure"])
def test_rendered_manifests_validate_against_kubernetes(values: dict[str, Any]) -> None:
    docs = render(values)
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(docs)
    for kind, doc in docs.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in Kubernetes; its fields are asserted below
        assert kubernetes_validate.validate(doc, KUBE_VERSION, strict=True) == KUBE_VERSION, kind


def test_statefulset_probes_identity_and_placement() -> None:
    docs = render(SECURE)
    sts, svc = docs["StatefulSet"], docs["Service"]
    assert sts["spec"]["replicas"] == 4
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == pod_labels
    c = container(docs)
    assert c["ports"] == [{"name": "http", "containerPort": 9400, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = env_of(c)
    # The member id is the pod name, which carries the StatefulSet ordinal.
    assert env["TANDEM_MEMBER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == pod_labels
    soft = render()["StatefulSet"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in soft
    assert c["resources"]["requests"] == {"cpu": "250m", "memory": "512Mi"}


def test_pdb_allows_one_worker_down_at_a_time() -> None:
    docs = render()
    pdb = docs["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = docs["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] == pod_labels
    assert "PodDisruptionBudget" not in render({"podDisruptionBudget": {"enabled": False}})


def test_secrets_come_from_secret_references_only() -> None:
    docs = render(SECURE)
    env = env_of(container(docs))
    assert env["TANDEM_SOURCE__SASL_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "kafka-user", "key": "password"}
    }
    assert env["TANDEM_SOURCE__SASL_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "kafka-user"
    assert env["TANDEM_HTTP__TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "tandem-token", "key": "token"}
    }
    assert all("value" not in e for e in env.values()), "no literal value in the pod spec"
    volumes = {v["name"]: v for v in docs["StatefulSet"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls-source"]["secret"]["secretName"] == "kafka-ca"
    assert volumes["tls-backup"]["secret"]["secretName"] == "dr-mtls"
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert mounts["tls-source"] == "/etc/tandem/tls/source"
    assert "Secret" not in docs  # the chart references secrets, it never holds one


def test_the_configmap_is_a_config_the_worker_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pod would load: the ConfigMap file plus the env the StatefulSet sets."""
    docs = render(SECURE)
    path = tmp_path / "tandem.yaml"
    path.write_text(docs["ConfigMap"]["data"]["tandem.yaml"])
    secrets = {
        ("kafka-user", "username"): "svc-tandem",
        ("kafka-user", "password"): "pw-from-secret",
        ("tandem-token", "token"): "tok-from-secret",
    }
    monkeypatch.setenv("TANDEM_MEMBER_ID", "prod-tandem-2")
    for name, e in env_of(container(docs)).items():
        ref = e["valueFrom"].get("secretKeyRef")
        if ref:
            monkeypatch.setenv(name, secrets[(ref["name"], ref["key"])])
    s = load_settings(path)
    assert s.member_id == "prod-tandem-2"
    assert s.http.address == ("0.0.0.0", 9400)
    assert s.http.token is not None and s.http.token.get_secret_value() == "tok-from-secret"
    assert s.source.topics == ["orders", "payments"]
    conf = s.source.confluent()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("svc-tandem", "pw-from-secret")
    assert conf["ssl.ca.location"] == "/etc/tandem/tls/source/ca.crt"
    backup = s.backup_cluster.confluent()
    assert backup["bootstrap.servers"] == "dr-kafka:9093"
    assert backup["security.protocol"] == "SSL"
    assert backup["ssl.certificate.location"] == "/etc/tandem/tls/backup/tls.crt"
    assert backup["ssl.key.location"] == "/etc/tandem/tls/backup/tls.key"
    assert "sasl.password" not in backup


def test_service_monitor_and_dashboard_configmap() -> None:
    docs = render(SECURE)
    sm = docs["ServiceMonitor"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert sm["spec"]["selector"]["matchLabels"] == docs["Service"]["spec"]["selector"]
    dashboards = [d for k, d in docs.items() if k.startswith("ConfigMap/")]
    (cm,) = dashboards
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["tandem.json"]) == json.loads(DASHBOARD.read_text())
    assert "ServiceMonitor" not in render()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 1}, "replicaCount"),
        ({"replicaCount": 40}, "replicaCount must not exceed mirror.maxWorkers"),
        ({"source": {"securityProtocol": "SASL_SSL"}}, "needs source.sasl.existingSecret"),
        ({"http": {"port": "http"}}, "port"),
        ({"podAntiAffinity": "sometimes"}, "podAntiAffinity"),
        ({"sourse": {}}, "sourse"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert message in str(info.value)


# -- dashboard ---------------------------------------------------------------------------------


def exported_names(bootstrap: str) -> set[str]:
    """Every sample name a worker's /metrics can show, with a committed set and a portion."""
    worker = Worker(load_settings(None, source={"bootstrap_servers": bootstrap, "topics": ["x"]}))
    metrics: Metrics = worker.metrics
    metrics.records_backed_up.labels("x", "0").inc(0)
    metrics.late_records.labels("x", "0").inc(0)
    text = metrics.render().decode()
    asyncio.run(worker.close())
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    # State that only exists once a set is committed or a portion is owned:
    names |= {
        "tandem_rpo_seconds",
        "tandem_last_committed_set_id",
        "tandem_last_committed_set_timestamp_seconds",
        "tandem_last_committed_window_end_seconds",
        "tandem_records_sequenced_total",
        "tandem_records_mirrored_total",
        "tandem_in_flight_records",
        "tandem_mirror_records_received_total",
    }
    return names


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_dashboard_queries_only_metrics_that_exist(bootstrap: str) -> None:
    names = exported_names(bootstrap)
    used = set()
    for title, expr in dashboard_exprs():
        for name in re.findall(r"\btandem_[a-z_]+", expr):
            assert name in names, f"panel {title!r} queries {name}, which no worker exports"
            used.add(name)
    assert len(used) >= 12


def test_dashboard_shows_what_an_sre_needs() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("RPO", "Last committed set", "lag", "In-flight", "Unprotected", "Failovers"):
        assert needed in titles
    exprs = " ".join(e for _, e in dashboard_exprs())
    assert 'kafka_consumergroup_lag{consumergroup=~"$group"}' in exprs
    assert dash["uid"] and isinstance(dash["panels"], list)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# -- docker-compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def host_path(volume: str) -> Path:
    return ROOT / volume.split(":")[0]


def test_compose_services_and_references() -> None:
    c = compose()
    services = c["services"]
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    assert sorted(workers) == ["worker-0", "worker-1", "worker-2"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            assert host_path(vol).exists(), f"{name} mounts missing {vol}"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "zookeeper" not in services
    for name, svc in workers.items():
        assert svc["build"] == "."
        assert svc["environment"]["TANDEM_MEMBER_ID"] == name
        (vol,) = svc["volumes"]
        config = load_settings(host_path(vol))
        assert config.source.bootstrap_servers == "kafka:9092"
        assert svc["environment"]["TANDEM_HTTP__LISTEN"] == "0.0.0.0:8080"
    assert "orders" in " ".join(services["topics"]["command"])
    assert "orders" in services["producer"]["command"]


def test_compose_prometheus_scrapes_every_worker_and_grafana_gets_the_dashboard() -> None:
    services = compose()["services"]
    (prom_vol,) = services["prometheus"]["volumes"]
    prom = yaml.safe_load(host_path(prom_vol).read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    (targets,) = [sc["targets"] for sc in jobs["tandem"]["static_configs"]]
    assert sorted(targets) == [f"worker-{i}:8080" for i in range(3)]
    exporter = jobs["kafka-exporter"]["static_configs"][0]["targets"][0].split(":")[0]
    assert exporter in services
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    dash_dir = ROOT / next(h for h, c in mounts.items() if c == "/var/lib/grafana/dashboards")
    assert (dash_dir / "tandem.json").resolve() == DASHBOARD.resolve()
    prov = ROOT / next(h for h, c in mounts.items() if c == "/etc/grafana/provisioning")
    (provider,) = yaml.safe_load((prov / "dashboards" / "tandem.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services


def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert 'ENTRYPOINT ["tandem"]' in text
    assert re.search(r"^USER 10001$", text, re.M)  # the chart's runAsUser
