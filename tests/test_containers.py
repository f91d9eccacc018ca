"""The container files, proven without a Docker engine: the compose services' own
commands run as local processes, the dashboard only uses exported metrics, and the
image's health check command tells SERVING from everything else."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from client.api import LanguageModelClient
from tests.conftest import REPO, TINY_MODEL, TINY_SHAKESPEARE, without_settings
from tests.container_files import (
    compose_service,
    entrypoint,
    healthcheck_command,
    interpolate,
)
from tests.server_process import ServerProcess, free_port, wait_until


def local_environment(service: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
    """The service's environment with its named volumes mapped to local directories."""
    targets = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        targets[target] = mounts[source]
    env = without_settings()
    for key, value in service["environment"].items():
        value = interpolate(str(value))
        for target, local in targets.items():
            if value == target or value.startswith(target + "/"):
                value = str(local) + value[len(target) :]
        env[key] = value
    return env


def test_compose_trainer_publishes_what_the_compose_server_serves(tmp_path: Path) -> None:
    mounts = {"models": tmp_path / "models", "data": tmp_path / "data"}
    for path in mounts.values():
        path.mkdir()
    # The trainer downloads Tiny Shakespeare into the data volume; no network here, so
    # put the verified file where the download would go.
    shutil.copy(TINY_SHAKESPEARE, mounts["data"] / "tinyshakespeare.txt")

    server = compose_service("server")
    server_env = local_environment(server, mounts)
    assert server_env["CHARGPT_CHECKPOINT"] == str(mounts["models"] / "model.safetensors")
    grpc_port = free_port()
    server_env.update(CHARGPT_PORT=str(grpc_port), CHARGPT_METRICS_PORT=str(free_port()),
                      CHARGPT_HOST="127.0.0.1", CHARGPT_RELOAD_SECONDS="0.2",
                      CHARGPT_COMPILE="false")  # fmt: skip  # (compiling takes minutes)
    trainer = compose_service("trainer")
    trainer_env = local_environment(trainer, mounts)
    # The small run the README shows: `docker compose run -e CHARGPT_MAX_ITERS=... trainer`.
    trainer_env.update(CHARGPT_MAX_ITERS="40", CHARGPT_EVAL_INTERVAL="20",
                       CHARGPT_EVAL_TOKENS="4000", CHARGPT_METRICS_PORT=str(free_port()))  # fmt: skip

    log = (tmp_path / "server.log").open("w")
    server_proc = subprocess.Popen(
        entrypoint() + server["command"], env=server_env, stdout=log, stderr=subprocess.STDOUT
    )
    client = LanguageModelClient(f"127.0.0.1:{grpc_port}", timeout=30)
    try:
        wait_until(lambda: client.health(timeout=1) == "NOT_SERVING", timeout=90)
        trained = subprocess.run(
            entrypoint() + trainer["command"], env=trainer_env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert (mounts["models"] / "model.safetensors").exists()
        wait_until(lambda: client.health(timeout=1) == "SERVING", timeout=60)
        text, summary = client.generate_text("ROMEO:", max_new_tokens=20)
        assert len(text) == 20
        assert summary.model.step in (20, 40)
    finally:
        client.close()
        server_proc.send_signal(signal.SIGTERM)
        assert server_proc.wait(30) == 0
        log.close()


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/chargpt.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in re.findall(r"\b(chargpt_[a-z0-9_]+)", expr)}


def exported_names(metrics_text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(metrics_text) for s in f.samples}


def test_every_dashboard_and_rule_metric_is_exported(trained_run: Path, tmp_path: Path) -> None:
    used = dashboard_metric_names()
    assert len(used) >= 15  # the parse found the queries

    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(trained_run / "model.safetensors", checkpoint)
    with ServerProcess(checkpoint) as server:
        server.client.generate_text("ROMEO:", max_new_tokens=5)
        server.client.score("ROMEO")
        server_names = exported_names(server.metrics_text())

    port = free_port()
    env = without_settings()
    data = tmp_path / "text.txt"
    data.write_text((TINY_SHAKESPEARE.read_text())[:50_000])
    trainer_proc = subprocess.Popen(
        [
            sys.executable, "-m", "chargpt", "train", "--data", str(data), "--out-dir",
            str(tmp_path / "run"), "--max-iters", "100000", "--eval-interval", "10",
            "--metrics-port", str(port), *TINY_MODEL,
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        wait_until(lambda: 'chargpt_trainer_loss{split="val"}' in scrape(), timeout=120)
        trainer_names = exported_names(scrape())
    finally:
        trainer_proc.send_signal(signal.SIGTERM)
        assert trainer_proc.wait(60) == 0

    missing = used - server_names - trainer_names
    assert not missing, f"dashboard or rules use metrics nobody exports: {sorted(missing)}"


@pytest.mark.parametrize("state", ["serving", "not serving", "absent"])
def test_image_health_check(state: str, trained_run: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    if state == "absent":
        result = subprocess.run(
            healthcheck_command(f"127.0.0.1:{free_port()}"), capture_output=True
        )
        assert result.returncode != 0
        return
    if state == "serving":
        shutil.copy(trained_run / "model.safetensors", checkpoint)
    with ServerProcess(checkpoint, wait_serving=state == "serving") as server:
        result = subprocess.run(healthcheck_command(server.target), capture_output=True, text=True)
    assert (result.returncode == 0) == (state == "serving"), result.stdout + result.stderr
