"""The deployment files say what the service does: ports, probe paths, setting names, and hosts
that exist.

These tests read the files; `kubectl kustomize` renders the manifests where kubectl is
installed. `make test-container` builds the image and runs it, compose.yaml and the manifests
with podman (tests/container).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from helpers.services import StartService
from prometheus_client.parser import text_string_to_metric_families

from lastseen.config.settings import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SETTINGS = {option.env for option in OPTIONS}


def _documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
    ]


def _containers(kind_name: str) -> list[dict[str, Any]]:
    (deployment,) = [
        d
        for d in _documents()
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == kind_name
    ]
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def _interpolated(value: str) -> str:
    """A compose value with each ``${NAME:-default}`` as its default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _hosts(service: dict[str, Any]) -> set[str]:
    """The host of every URL in a service's settings and command."""
    values = [*service.get("environment", {}).values(), *service.get("command", [])]
    urls = [_interpolated(str(v)) for v in values if "://" in str(v)]
    return {urlsplit(url).hostname or "" for url in urls}


def test_compose_runs_the_whole_system_on_postgres_with_known_settings() -> None:
    """compose.yaml: PostgreSQL with a healthcheck that both roles wait for, the ingest role
    publishing the port it listens on, only settings lastseen has, and under the demo profile
    the simulated upstream and producer; every host a service names is a service of the file,
    on the port that service listens on."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "ingest", "worker", "upstream", "producer"}
    assert {name for name, s in services.items() if "profiles" in s} == {"upstream", "producer"}
    assert services["upstream"]["profiles"] == services["producer"]["profiles"] == ["demo"]
    assert "healthcheck" in services["postgres"]
    for role in ("ingest", "worker"):
        service = services[role]
        assert service["command"] == ["serve", "--role", role]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert set(service["environment"]) <= SETTINGS, set(service["environment"]) - SETTINGS
    listen_port = services["ingest"]["environment"]["LASTSEEN_LISTEN"].rsplit(":", 1)[1]
    assert [_interpolated(p) for p in services["ingest"]["ports"]] == [f"9090:{listen_port}"]
    for name, service in services.items():
        assert _hosts(service) <= set(services), (name, _hosts(service))
    assert _hosts(services["worker"]) == {"postgres", "upstream"}
    objects_url = _interpolated(services["worker"]["environment"]["LASTSEEN_OBJECTS_URL"])
    upstream = services["upstream"]["command"]
    assert upstream[:3] == ["simulate", "--mode", "upstream"]
    assert upstream[upstream.index("--upstream-listen") + 1].endswith(
        f":{urlsplit(objects_url).port}"
    )
    producer = services["producer"]["command"]
    assert producer[:3] == ["simulate", "--mode", "producer"]
    target = urlsplit(producer[producer.index("--target") + 1])
    assert (target.hostname, str(target.port), target.path) == ("ingest", listen_port, "/callback")


def test_kubernetes_probes_ports_and_settings_match_the_service() -> None:
    """The ingest Deployment probes /health and /ready on the port lastseen listens on and
    drains before it stops; the worker is probed on /health; the Service targets that port;
    every LASTSEEN_* name in the ConfigMap, the Secret and the containers is a setting."""
    documents = _documents()
    kinds = {d["kind"] for d in documents}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    (config,) = [d for d in documents if d["kind"] == "ConfigMap"]
    (secret,) = [d for d in documents if d["kind"] == "Secret"]
    names = set(config["data"]) | set(secret["stringData"])
    for role in ("lastseen-ingest", "lastseen-worker"):
        for container in _containers(role):
            names |= {env["name"] for env in container.get("env", [])}
    assert names <= SETTINGS, names - SETTINGS
    port = int(config["data"]["LASTSEEN_LISTEN"].rsplit(":", 1)[1])
    (ingest,) = _containers("lastseen-ingest")
    assert ingest["args"] == ["serve", "--role", "ingest"]
    assert ingest["ports"] == [{"name": "http", "containerPort": port}]
    assert ingest["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert ingest["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert "preStop" in ingest["lifecycle"]
    # Its spool on a volume of its own that a restarted pod, under the same name, finds again.
    env = {e["name"]: e for e in ingest["env"]}
    assert env["LASTSEEN_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (mount,) = ingest["volumeMounts"]
    assert mount["mountPath"] == env["LASTSEEN_DATA_DIR"]["value"]
    (statefulset,) = [d for d in documents if d["kind"] == "StatefulSet"]
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == [mount["name"]]
    assert float(config["data"]["LASTSEEN_SHUTDOWN_DELAY"]) > 0
    (worker,) = _containers("lastseen-worker")
    assert worker["args"] == ["serve", "--role", "worker"]
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health"
    (service,) = [d for d in documents if d["kind"] == "Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == {"app.kubernetes.io/component": "ingest"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    """`kubectl kustomize deploy/k8s` renders every resource."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered.stdout)]
    assert sorted(kinds) == sorted(
        ["ConfigMap", "Secret", "StatefulSet", "Deployment", "Service", "PodDisruptionBudget"]
    )


def test_the_image_runs_serve_as_a_non_root_user_with_a_healthcheck() -> None:
    """The Dockerfile: two stages on one base (the official image unless BASE says otherwise),
    a non-root user, a HEALTHCHECK on /health, `lastseen serve` by default (hadolint checks the
    rest in make test; make test-container builds and runs it)."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "ARG BASE=python:3.11-slim-bookworm" in lines
    assert [line.split()[1] for line in lines if line.startswith("FROM ")] == ["${BASE}"] * 2
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/health" in line for line in lines)
    assert 'ENTRYPOINT ["lastseen"]' in lines
    assert 'CMD ["serve"]' in lines


def _metric_names(text: str) -> set[str]:
    """Every series name a scrape offers, families without samples yet included."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


async def test_dashboard_and_alerts_name_only_metrics_that_exist(
    start_service: StartService,
) -> None:
    """Every lastseen_* metric the Grafana dashboard and the alert rules use is in a scrape of
    a running instance; the rules parse, and each has a severity and a summary."""
    service = await start_service()
    async with service.http.get(service.url + "/metrics") as response:
        offered = _metric_names(await response.text())
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts
    for rule in alerts:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "lastseen.json").read_text())
    expressions = [rule["expr"] for rule in alerts] + [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    used = {name for expr in expressions for name in re.findall(r"\blastseen_[a-z_]+", expr)}
    assert len(used) > 15
    assert used <= offered, sorted(used - offered)
