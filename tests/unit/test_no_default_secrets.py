"""No default admin token anywhere: compose refuses to start without one, the Dockerfile and the
settings have none (an empty setting means "generate one at first start, print it once")."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tally.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_requires_an_admin_token() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    value = doc["x-tally-env"]["TALLY_ADMIN_TOKEN"]
    assert re.fullmatch(r"\$\{TALLY_ADMIN_TOKEN:\?[^}]+\}", value), value
    envs = [doc["x-tally-env"]] + [s.get("environment") or {} for s in doc["services"].values()]
    for env in envs:
        for k, v in env.items():
            if "TOKEN" in k:  # a secret may be required or empty, never defaulted to a value
                assert not re.search(r":-[^}]", str(v)), (k, v)


def test_no_default_token_in_the_image_or_the_settings() -> None:
    assert "TOKEN" not in (ROOT / "Dockerfile").read_text()
    s = Settings()
    assert s.admin_token == "" and s.metrics_token == ""
