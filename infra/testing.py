"""The service stack under test (used by tests/integration, never by the pipeline).

`start()` runs `python -m infra.stack up` (what `make up` runs) in a temporary state folder on free
ports; `stop()` runs `down`. `deployed_stack()` is the one stack the deployment and UI tests share
in a pytest session: started, deployed, and two small `finetune` runs triggered at once and
finished, so each test only reads what happened.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftflow.utils import PROJECT_ROOT
from infra.stack import http

# A small run: 1 epoch capped at 15 optimizer steps (of ~63), 10 held-out rows scored.
SMALL = ["train.epochs=1", "train.max_steps=15", "train.save_steps=40", "train.logging_steps=10", "eval.max_samples=10",
         "registry.model_name=ftflow-stack"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StackUnderTest:
    home: Path
    env: dict[str, str]
    prefect_port: int
    mlflow_port: int
    deployments: dict[str, str] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> flow run (as the API returns it)

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def api(self, method: str, path: str, body: Any = None, attempts: int = 6) -> Any:
        # Like Prefect's own client: 429/502/503/504 are transient (a busy SQLite store answers 503).
        for attempt in range(attempts):
            status, out = http(method, self.prefect_api_url + path, body, _auth(self.env))
            if status not in (429, 502, 503, 504) or attempt == attempts - 1:
                break
            time.sleep(2 * (attempt + 1))
        if status >= 300:
            raise AssertionError(f"Prefect API {method} {path} -> {status}: {str(out)[:800]}")
        return out

    def log(self, part: str) -> str:
        p = self.home / "stack" / "logs" / f"{part}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stack_cmd(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "infra.stack", *args], cwd=PROJECT_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def _auth(env: dict[str, str]) -> dict[str, str]:
    auth = env.get("PREFECT_SERVER_API_AUTH_STRING")
    if not auth:
        return {}
    import base64

    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without Prefect/MLflow settings, pointed at `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "FTFLOW_"))}
    env.update({"FTFLOW_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1", **extra})
    return env


def start(home: Path, *args: str, **extra_env: str) -> StackUnderTest:
    s = StackUnderTest(home, {}, free_port(), free_port())
    s.env = clean_env(home, FTFLOW_PREFECT_PORT=str(s.prefect_port), FTFLOW_MLFLOW_PORT=str(s.mlflow_port),
                      PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
                      **extra_env)
    proc = s.stack_cmd("up", *args)
    if proc.returncode != 0:
        s.stack_cmd("down")
        raise AssertionError(f"`infra.stack up` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return s


def stop(s: StackUnderTest) -> None:
    s.stack_cmd("down", timeout=120)


def small_config(seed: int) -> dict[str, Any]:
    from ftflow.config import load_config

    return load_config(PROJECT_ROOT / "configs" / "demo.yaml", [*SMALL, f"train.seed={seed}"]).model_dump(mode="json")


def trigger(s: StackUnderTest, deployment: str, parameters: dict[str, Any], name: str) -> dict[str, Any]:
    dep = s.api("GET", f"/deployments/name/{deployment}")
    return s.api("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters, "name": name})


def wait_final(s: StackUnderTest, run_ids: list[str], timeout_s: float = 600) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        runs = {r["id"]: r for r in s.api("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}})}
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs.values()) and len(runs) == len(run_ids):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"flow runs not finished after {timeout_s:.0f} s: "
                                 f"{[(r['name'], r['state']['type']) for r in runs.values()]}\n{s.log('worker')[-4000:]}")
        time.sleep(2)


_SHARED: StackUnderTest | None = None
_SHARED_ERROR: BaseException | None = None


def deployed_stack() -> StackUnderTest:
    """One stack per test session: up, deployed, two finetune runs (seeds 1 and 2) triggered at once
    and finished, then a third with seed 1 again (its convert/tokenize come from Prefect's cache)."""
    global _SHARED, _SHARED_ERROR
    if _SHARED_ERROR is not None:
        raise AssertionError(f"the shared stack failed to set up: {_SHARED_ERROR}")
    if _SHARED is not None:
        return _SHARED
    home = Path(tempfile.mkdtemp(prefix="ftflow-stack-"))
    s = start(home)
    atexit.register(stop, s)  # also stopped by the tests' session finalizers; `down` is idempotent
    _SHARED = s
    try:
        _run_scenario(s)
    except BaseException as err:
        _SHARED_ERROR = err
        raise
    return s


def _deploy(s: StackUnderTest, attempts: int = 3) -> None:
    """Deploy and list the deployments. Idempotent, so retried: on a brand-new venv the first
    server start does one-off work (Prefect builds its UI bundle) and an early call can fail."""
    errors = []
    for attempt in range(attempts):
        proc = subprocess.run([sys.executable, "-m", "infra.deploy"], cwd=PROJECT_ROOT,
                              env={**s.env, "PREFECT_API_URL": s.prefect_api_url}, capture_output=True, text=True, timeout=300)
        try:
            if proc.returncode != 0:
                raise AssertionError(f"`infra.deploy` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            s.deployments = {d["flow_name"] + "/" + d["name"]: d["id"] for d in _deployments(s)}
            if "finetune/nightly" not in s.deployments:
                raise AssertionError(f"deployment finetune/nightly missing after deploy: {sorted(s.deployments)}")
            return
        except AssertionError as err:
            errors.append(str(err))
            sys.stderr.write(f"deploy attempt {attempt + 1} failed (retrying): {err}\n")
            time.sleep(10)
    raise AssertionError("deploy failed %d times:\n%s" % (attempts, "\n---\n".join(errors)))


def _run_scenario(s: StackUnderTest) -> None:
    _deploy(s)
    a = trigger(s, "finetune/nightly", {"config": small_config(1)}, "stack-test-a")
    b = trigger(s, "finetune/nightly", {"config": small_config(2)}, "stack-test-b")
    done = wait_final(s, [a["id"], b["id"]])
    s.runs = {"a": done[a["id"]], "b": done[b["id"]]}
    c = trigger(s, "finetune/nightly", {"config": small_config(1)}, "stack-test-c")
    s.runs["c"] = wait_final(s, [c["id"]])[c["id"]]


def _deployments(s: StackUnderTest) -> list[dict[str, Any]]:
    deps = s.api("POST", "/deployments/filter", {})
    flows = {f["id"]: f["name"] for f in s.api("POST", "/flows/filter", {})}
    return [{**d, "flow_name": flows[d["flow_id"]]} for d in deps]


def stop_shared() -> None:
    if _SHARED is not None:
        stop(_SHARED)


def task_runs(s: StackUnderTest, flow_run_id: str) -> list[dict[str, Any]]:
    return s.api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})

