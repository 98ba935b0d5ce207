"""The deployment files agree with the code (reads repository files only, no I/O beyond that):
the image gets every package, compose mounts the files that exist, the dashboard is well formed.
Whether each PromQL expression runs and names exported metrics is checked against a real
Prometheus in tests/integration/e2e/test_prometheus.py."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1].parent


def test_the_image_copies_every_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert packages <= copied, f"Dockerfile does not COPY {sorted(packages - copied)}"


def test_compose_mounts_existing_deploy_files_and_exposes_worker_metrics() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
    worker = services["worker"]
    assert worker["environment"]["TALLY_WORKER_METRICS_HOST"] == "0.0.0.0"
    port = worker["environment"]["TALLY_WORKER_METRICS_PORT"]
    assert port in [str(p) for p in worker["expose"]]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert jobs["tally-worker"]["dns_sd_configs"][0]["port"] == int(port)
    assert jobs["tally-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["tally-api"]["dns_sd_configs"][0]["names"] == ["api"]
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_dashboard_is_well_formed() -> None:
    doc = json.loads((ROOT / "deploy/grafana/dashboards/tally.json").read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert doc["uid"] == "tally-overview"
    (var,) = doc["templating"]["list"]
    assert var["type"] == "datasource" and var["name"] == "datasource"
    titles = " | ".join(p["title"] for p in doc["panels"])
    for needed in (
        "accepted (API) vs stored",
        "Duplicates",
        "Rejected events/s by reason",
        "lag per partition",
        "Freshness",
        "Flush latency",
        "Store insert rate",
        "Usage query latency",
        "Top tenants",
        "Resident memory",
        "CPU",
    ):
        assert needed in titles, needed
    for p in doc["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"]
    provisioned = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert provisioned["datasources"][0]["uid"] == var["current"]["value"]
