"""docs/ingest.md runs as written: every ```sh block, in order, against a running `tally run`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.integration.e2e.harness import REPO, create_tenant, start_embedded

DOC = REPO / "docs" / "ingest.md"
# Each curl of the doc must succeed (2xx); its answer goes on a line of its own.
PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body -sS -w '\\n' "$@"; }
"""


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def test_every_example_of_the_ingest_doc_runs_and_counts(tmp_path: Path) -> None:
    text = DOC.read_text()
    blocks = shell_blocks(text)
    assert len(blocks) >= 8, "the doc lost its examples"
    proc, url = start_embedded(tmp_path / "data", tmp_path / "tally.log")
    try:
        key = create_tenant(url, "docs")
        tenant = key.split("_")[1]
        script = PRELUDE + "\n".join(blocks)
        out = subprocess.run(
            ["bash", "-c", script],
            env={"URL": url, "KEY": key, "TENANT": tenant, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        answers = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        native = next(a for a in answers if "rejected" in a and "success" not in a)
        assert native["accepted"] == 1 and native["rejected"][0]["field"] == "time"
        batch = next(a for a in answers if a.get("ignored"))
        assert batch == {"success": True, "accepted": 2, "ignored": 1, "rejected": []}
        usage = answers[-1]
        counted = set(re.findall(r'"(doc-[a-z]+-\d+)"', text))
        assert len(counted) == 6
        assert [(r["customer"], r["value"]) for r in usage["data"]] == [
            ("cust-1", str(len(counted)))
        ]
    finally:
        assert proc.terminate() == 0, proc.tail()
