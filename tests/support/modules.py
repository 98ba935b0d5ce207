"""Run a module of the repository as ``python -m``, the way its documentation tells a user to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, timeout: float = 300) -> str:
    """``python -m module args`` from the repository's root; its standard output. Fails the test
    (with the ends of both outputs) when the module exits with an error."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout
