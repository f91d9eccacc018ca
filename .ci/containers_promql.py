"""Questions to Prometheus's HTTP API, for .ci/containers.

python .ci/containers_promql.py URL has QUERY
    exit 0 if the instant QUERY returns at least one series
python .ci/containers_promql.py URL dashboard GRAFANA_DIR START
    every panel of the provisioned dashboards, its queries as Grafana would send them
    over [START, now]: prints 'ok ...' or 'FAIL ...' per panel
python .ci/containers_promql.py URL rules
    exit 0 if every rule loaded from rule_files has been evaluated without error
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

# Grafana's default for a data source whose scrape interval is not set (timeInterval).
GRAFANA_SCRAPE_INTERVAL_S = 15


def api(url: str, path: str, **params: str) -> dict:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


def has(url: str, query: str) -> bool:
    return bool(api(url, "query", query=query)["result"])


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def rate_interval(grafana: Path, step: int) -> str:
    """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval)."""
    scrape = GRAFANA_SCRAPE_INTERVAL_S
    for path in (grafana / "provisioning" / "datasources").glob("*.y*ml"):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            if source.get("type") == "prometheus" and "timeInterval" in source.get("jsonData", {}):
                scrape = seconds(source["jsonData"]["timeInterval"])
    return f"{max(step + scrape, 4 * scrape)}s"


def dashboard(url: str, grafana: Path, start: float) -> bool:
    step = GRAFANA_SCRAPE_INTERVAL_S
    interval = rate_interval(grafana, step)
    all_ok = True
    for path in sorted((grafana / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            empty = []
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", interval)
                if "$" in expr:
                    raise SystemExit(f"{panel['title']}: a Grafana variable is left in {expr}")
                data = api(url, "query_range", query=expr, start=str(start),
                           end=str(time.time()), step=str(step))  # fmt: skip
                values = [float(v) for series in data["result"] for _, v in series["values"]]
                if not any(math.isfinite(v) for v in values):
                    empty.append(target["expr"])
            n = len(panel.get("targets", []))
            if empty:
                all_ok = False
                print(f"FAIL dashboard panel '{panel['title']}': {n - len(empty)}/{n} queries"
                      f" return data; none from: {'; '.join(empty)}")  # fmt: skip
            else:
                print(f"ok dashboard panel '{panel['title']}': {n}/{n} queries return data")
    return all_ok


def rules(url: str) -> bool:
    groups = api(url, "rules")["groups"]
    found = [r for g in groups for r in g["rules"]]
    never = "0001-01-01T00:00:00Z"
    bad = [r["name"] for r in found if r["health"] != "ok" or r["lastEvaluation"] == never]
    print(f"{len(found)} rules, not evaluated or failing: {bad or 'none'}")
    return bool(found) and not bad


def main(argv: list[str]) -> int:
    url, command, *args = argv
    if command == "has":
        return 0 if has(url, args[0]) else 1
    if command == "dashboard":
        return 0 if dashboard(url, Path(args[0]), float(args[1])) else 1
    if command == "rules":
        return 0 if rules(url) else 1
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
