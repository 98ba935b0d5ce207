"""The repository stands alone: nothing in it reads a sibling folder of the checkout (no I/O
beyond reading the repository's own files)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|parents\[\d+\]\s*/\s*['\"]\.\.['\"]")


def test_no_file_reaches_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    me = Path(__file__).resolve()
    bad = []
    for name in files:
        path = ROOT / name
        if path.resolve() == me or path.suffix not in {".py", ".md", ".toml", ".yml", ".sh", ""}:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        bad += [f"{name}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not bad, "files reading outside the repository:\n" + "\n".join(bad)
