"""A real Prometheus server scrapes the real inference server."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.server_process import ServerProcess, free_port, wait_until

PROMETHEUS = shutil.which("prometheus")


def query(port: int, expr: str) -> list[dict]:  # type: ignore[type-arg]
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=60) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (.ci/run installs it)")
def test_prometheus_scrapes_the_generated_characters_counter(
    trained_run: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(trained_run / "model.safetensors", checkpoint)
    with ServerProcess(checkpoint) as server:
        server.client.generate_text("ROMEO:", max_new_tokens=37)
        server.client.generate_text("JULIET:", max_new_tokens=5)
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: chargpt-server\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{server.metrics_port}']}}]\n"
        )
        prometheus = subprocess.Popen(
            [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def scraped() -> bool:
                result = query(port, 'chargpt_generated_characters_total{job="chargpt-server"}')
                return len(result) == 1 and float(result[0]["value"][1]) == 42

            wait_until(scraped, timeout=120, interval=0.5)
            up = query(port, 'up{job="chargpt-server"}')
            assert float(up[0]["value"][1]) == 1
            requests = query(port, 'chargpt_requests_total{method="Generate",code="OK"}')
            assert float(requests[0]["value"][1]) == 2
        finally:
            prometheus.terminate()
            prometheus.wait(30)
