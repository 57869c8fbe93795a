"""The `ftflow` process itself: its fast exit keeps exit codes and output; Prefect's temporary
server is started early (while the stage libraries import) and is the one the flow's client uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftflow.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_fast_exit_keeps_exit_codes_and_flushes_output(tmp_path):
    missing = _cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: config file") and "Traceback" not in missing.stderr
    # a long stdout report written just before the fast exit arrives whole (--json parses)
    ok = _cli("tokenize", "configs/demo.yaml", "--json", env={"FTFLOW_HOME": str(tmp_path / "home")})
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads(ok.stdout)
    assert report["stats"]["samples"] > 0 and Path(report["path"]).is_dir()


def test_prefect_server_started_early_is_the_one_the_flow_uses(tmp_path):
    code = """
import os, sys
from infra.local import configure_environment, start_prefect_server_early
configure_environment()
wait = start_prefect_server_early()
wait()
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
assert server.running and server.server_process is not None and server.server_process.poll() is None
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    assert str(client.api_url).rstrip("/") == server.api_url, (client.api_url, server.api_url)
    client.api_healthcheck()
print("ok", server.api_url)
"""
    env = {**os.environ, "FTFLOW_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok http://127.0.0.1:"), r.stderr[-3000:]
    # with a server configured, nothing is started
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    r = subprocess.run([sys.executable, "-c", "from infra.local import start_prefect_server_early as s\n"
                        "w = s(); w()\nfrom prefect.server.api.server import SubprocessASGIServer as S\n"
                        "assert not S._instances, S._instances\nprint('none')"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "none", r.stderr[-3000:]
