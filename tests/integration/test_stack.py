"""`make up` / `make down` (python -m infra.stack) with real processes on free 127.0.0.1 ports, auth on:
Prefect's API auth string and MLflow's basic-auth app. Idempotent `up`, loopback-only sockets,
unauthenticated requests refused, a dead worker restarted, and nothing left running after `down`.
"""

from __future__ import annotations

import base64
import json
import os
import signal

import psutil
import pytest

from infra import testing
from infra.stack import http

pytestmark = pytest.mark.integration

PREFECT_AUTH = "ftflow-admin:prefect-test-secret"
MLFLOW_USER, MLFLOW_PASSWORD = "ftflow-admin", "mlflow-Test-secret-42"


def _basic(user_pass: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def _pids(s) -> dict[str, int]:
    return json.loads((s.home / "stack" / "stack.json").read_text())["pids"]


def _tree(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out |= {pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory):
    s = testing.start(
        tmp_path_factory.mktemp("stack-auth"),
        PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
        FTFLOW_MLFLOW_AUTH="1", MLFLOW_TRACKING_USERNAME=MLFLOW_USER, MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD,
    )
    try:
        yield s
    finally:
        testing.stop(s)


def test_up_again_keeps_the_healthy_parts(auth_stack):
    before = _pids(auth_stack)
    assert set(before) == {"prefect-server", "mlflow", "worker"}
    proc = auth_stack.stack_cmd("up")
    assert proc.returncode == 0, proc.stderr
    assert _pids(auth_stack) == before
    status = auth_stack.stack_cmd("status")
    assert status.returncode == 0 and status.stderr.count("healthy") == 3, status.stderr
    for part in ("prefect-server", "mlflow", "worker"):
        assert (auth_stack.home / "stack" / "logs" / f"{part}.log").stat().st_size > 0


def test_servers_listen_on_loopback_only(auth_stack):
    tree = _tree(_pids(auth_stack).values())
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in tree]
    ports = {c.laddr.port for c in listening}
    assert {auth_stack.prefect_port, auth_stack.mlflow_port} <= ports
    assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening


def test_unauthenticated_requests_are_refused(auth_stack):
    s = auth_stack
    assert http("POST", f"{s.prefect_api_url}/flows/filter", {})[0] == 401
    assert http("POST", f"{s.prefect_api_url}/flows/filter", {}, _basic("ftflow-admin:wrong"))[0] == 401
    assert http("POST", f"{s.prefect_api_url}/flows/filter", {}, _basic(PREFECT_AUTH))[0] == 200

    search = f"{s.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert http("GET", search)[0] == 401
    assert http("GET", search, headers=_basic(f"{MLFLOW_USER}:wrong"))[0] == 401
    status, body = http("GET", search, headers=_basic(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}"))
    assert status == 200, body
    # the worker, given the auth string by `up`, is online (it authenticated)
    workers = s.api("POST", "/work_pools/ftflow/workers/filter", {})
    assert any(w["status"] == "ONLINE" for w in workers)


def test_a_dead_worker_is_restarted_by_up(auth_stack):
    before = _pids(auth_stack)
    os.killpg(before["worker"], signal.SIGKILL)
    assert auth_stack.stack_cmd("status").returncode == 1
    proc = auth_stack.stack_cmd("up")
    assert proc.returncode == 0, proc.stderr
    after = _pids(auth_stack)
    assert after["worker"] != before["worker"]
    assert (after["prefect-server"], after["mlflow"]) == (before["prefect-server"], before["mlflow"])


def test_down_leaves_no_processes(auth_stack):
    tree = _tree(_pids(auth_stack).values())
    assert len(tree) >= 3
    proc = auth_stack.stack_cmd("down")
    assert proc.returncode == 0, proc.stderr
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [psutil.Process(p).cmdline() for p in alive]
    assert not (auth_stack.home / "stack" / "stack.json").exists()
    assert auth_stack.stack_cmd("down").returncode == 0  # idempotent
    for port in (auth_stack.prefect_port, auth_stack.mlflow_port):
        with pytest.raises(OSError):
            http("GET", f"http://127.0.0.1:{port}/", timeout=2)
