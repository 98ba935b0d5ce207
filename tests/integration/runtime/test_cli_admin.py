"""`tally keys`, `tally admin-tokens` and `tally limits`: through the admin API of a running
`tally run`, and on the store directly once it is stopped."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.e2e.harness import ADMIN_TOKEN, REPO, start_embedded, tally_env


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=REPO,
        env=tally_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def secret(out: str, label: str) -> str:
    m = re.search(rf"^{label}:\s+(\S+)", out, re.M)
    assert m, out
    return m.group(1)


def code(url: str, token: str, path: str = "/v1/meters") -> int:
    return httpx.get(
        url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).status_code


def test_keys_tokens_and_limits_from_the_command_line(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    proc, url = start_embedded(
        tmp_path / "data", tmp_path / "tally.log", TALLY_COUNTERS_FLUSH_S="1"
    )
    adm = ("--data-dir", data, "--admin-token", ADMIN_TOKEN)
    try:
        out = cli("tenant", "create", "acme", *adm).stdout
        tenant = secret(out, "tenant_id")
        first = secret(out, "api_key")
        out = cli("keys", "create", "--tenant", tenant, "--name", "ci", *adm).stdout
        ci = secret(out, "api_key")
        ci_id = out.split("\t", 1)[0]
        assert code(url, ci) == 200
        time.sleep(2.5)  # the server writes last-used times every second here
        listed = cli("keys", "list", "--tenant", tenant, *adm).stdout
        assert "last used never" not in listed.splitlines()[1], listed
        assert [ln.split("\t")[2] for ln in listed.splitlines()] == ["default", "ci"]
        assert first not in listed and ci not in listed

        out = cli("keys", "rotate", ci_id, "--tenant", tenant, "--overlap", "0", *adm).stdout
        ci2 = secret(out, "api_key")
        assert code(url, ci) == 401 and code(url, ci2) == 200
        ci2_id = out.splitlines()[1].split("\t", 1)[0]
        cli("keys", "revoke", ci2_id, "--tenant", tenant, *adm)
        assert code(url, ci2) == 401 and code(url, first) == 200

        out = cli("admin-tokens", "create", "--name", "ops", *adm).stdout
        ops = secret(out, "admin_token")
        ops_id = out.split("\t", 1)[0]
        assert code(url, ops, "/v1/admin/tenants") == 200
        listed = cli("admin-tokens", "list", *adm).stdout
        assert "ops" in listed and ops not in listed
        cli("admin-tokens", "revoke", ops_id, *adm)
        assert code(url, ops, "/v1/admin/tenants") == 401

        out = cli("limits", "set", "--tenant", tenant, "--requests-per-second", "7", *adm).stdout
        assert "requests_per_second\t7\t(override)" in out
        out = cli("limits", "show", "--tenant", tenant, *adm).stdout
        assert "requests_per_second\t7\t(override)" in out
        assert "monthly_events\tunlimited\t(default)" in out

        bad = cli(
            "keys",
            "list",
            "--tenant",
            tenant,
            "--data-dir",
            data,
            "--admin-token",
            "nope",
            check=False,
        )
        assert bad.returncode == 1 and "401" in bad.stderr and "nope" not in bad.stderr
        assert proc.terminate() == 0, proc.tail()

        # the server is stopped: the CLI works on the store directly
        listed = cli("keys", "list", "--tenant", tenant, "--data-dir", data).stdout
        status = {ln.split("\t")[0]: ln.split("\t")[1] for ln in listed.splitlines()}
        assert status[ci_id] == "expired" and status[ci2_id] == "revoked"
        assert list(status.values()).count("active") == 1
        # the last use of the first key, just before the stop, was flushed at shutdown
        assert all("last used never" not in ln for ln in listed.splitlines()), listed
        out = cli("limits", "show", "--tenant", tenant, "--data-dir", data).stdout
        assert "requests_per_second\t7\t(override)" in out
        out = cli("admin-tokens", "create", "--data-dir", data).stdout
        assert secret(out, "admin_token").startswith("tla_")
    finally:
        if proc.alive():
            proc.kill9()
