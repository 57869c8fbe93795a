"""The local service stack: a Prefect server (API + UI), an MLflow tracking server (+ UI) and a
Prefect worker on a process work pool, all on 127.0.0.1, all state under the project-local folder.

    python -m infra.stack up       # what `make up` runs; idempotent (healthy parts are kept)
    python -m infra.stack status   # exit 0 only when every part is healthy
    python -m infra.stack env      # `export ...` lines that point ftflow / prefect / mlflow at the stack
    python -m infra.stack down     # what `make down` runs; stops every process it started, and their children

Settings (environment; command-line flags override):
    FTFLOW_STACK_HOST            127.0.0.1   listen address; anything else exposes the servers (turn auth on first)
    FTFLOW_PREFECT_PORT          4200
    FTFLOW_MLFLOW_PORT           5000
    FTFLOW_WORK_POOL             ftflow      process work pool the local worker serves
    FTFLOW_GPU_SLOTS             1           size of the `gpu` global concurrency limit (trainings at once)
    FTFLOW_MLFLOW_BACKEND_URI    sqlite:///<state>/mlflow.db   (a postgresql://... URI works too)
    PREFECT_SERVER_DATABASE_CONNECTION_URL   Prefect's own database (default SQLite under <state>/stack/)
    PREFECT_SERVER_API_AUTH_STRING           "user:password": the Prefect API refuses requests without it
    FTFLOW_MLFLOW_AUTH=1         MLflow's basic-auth app; admin = MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD

Layout under the state folder (`ftflow.utils.state_dir()`, moved by FTFLOW_HOME):
    stack/stack.json             pids, ports and URLs of the running parts
    stack/logs/{prefect-server,mlflow,worker}.log
    stack/prefect-server/        the Prefect server's home (its SQLite database, UI build)
    prefect/                     the worker's Prefect home (flow-run result and task cache storage)
    mlflow.db, mlartifacts/      MLflow (the same store `ftflow run` uses without servers)
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ftflow.utils import PROJECT_ROOT, state_dir

log = logging.getLogger("ftflow.stack")

PARTS = ("prefect-server", "mlflow", "worker")  # start order; stopped in reverse
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class StackError(RuntimeError):
    """A part did not start or is unhealthy; the message names it and its log file."""


@dataclass
class StackSettings:
    home: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    work_pool: str = "ftflow"
    gpu_slots: int = 1
    mlflow_backend_uri: str = ""
    mlflow_auth: bool = False
    worker: bool = True
    timeout_s: float = 180.0

    @classmethod
    def from_env(cls, **overrides: Any) -> "StackSettings":
        e = os.environ
        s = cls(
            home=state_dir(),
            host=e.get("FTFLOW_STACK_HOST", "127.0.0.1"),
            prefect_port=int(e.get("FTFLOW_PREFECT_PORT", 4200)),
            mlflow_port=int(e.get("FTFLOW_MLFLOW_PORT", 5000)),
            work_pool=e.get("FTFLOW_WORK_POOL", "ftflow"),
            gpu_slots=int(e.get("FTFLOW_GPU_SLOTS", 1)),
            mlflow_backend_uri=e.get("FTFLOW_MLFLOW_BACKEND_URI", ""),
            mlflow_auth=e.get("FTFLOW_MLFLOW_AUTH", "0").lower() in ("1", "true", "yes"),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        if not s.mlflow_backend_uri:
            s.mlflow_backend_uri = f"sqlite:///{s.home / 'mlflow.db'}"
        return s

    @property
    def dir(self) -> Path:
        return self.home / "stack"

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def prefect_url(self) -> str:
        return f"http://{self.client_host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.client_host}:{self.mlflow_port}"


@dataclass
class Running:
    """What `up` wrote to stack.json: enough to find, check and stop every part."""

    prefect_api_url: str
    mlflow_url: str
    work_pool: str
    pids: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # psutil create_time, guards against pid reuse
    logs: dict[str, str] = field(default_factory=dict)
    worker_name: str = ""  # unique per start: a stale ONLINE record of a dead worker never counts


# --- HTTP -----------------------------------------------------------------------------------


def prefect_auth_header() -> dict[str, str]:
    """The header Prefect clients send when the server has an API auth string (HTTP Basic)."""
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def mlflow_auth_header() -> dict[str, str]:
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()} if user and pw else {}


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
    """(status, parsed JSON or text). HTTP errors are returned, connection errors raised (OSError)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


def prefect_api(method: str, path: str, body: Any = None, api_url: str | None = None) -> Any:
    """Call the Prefect REST API (`path` like "/deployments/filter"); raise on a non-2xx status."""
    api_url = api_url or os.environ["PREFECT_API_URL"]
    status, out = http(method, api_url.rstrip("/") + path, body, prefect_auth_header())
    if status >= 300:
        raise StackError(f"Prefect API {method} {path} -> {status}: {str(out)[:500]}")
    return out


# --- processes ------------------------------------------------------------------------------


def _alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and (started is None or abs(p.create_time() - started) < 1)
    except psutil.Error:
        return False


def _spawn(name: str, cmd: list[str], env: dict[str, str], s: StackSettings) -> tuple[int, float, Path]:
    logs = s.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        # Its own session: `down` can signal the part and everything it started, and nothing else.
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid, psutil.Process(proc.pid).create_time(), log_path


def _tail(path: str | Path, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop_tree(pid: int, started: float | None = None, grace_s: float = 15) -> None:
    """SIGTERM the process, its group and every descendant (flow runs, training ranks); SIGKILL leftovers."""
    if not _alive(pid, started):
        return
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    groups = {pid}
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            pass
    for g in groups:
        if g > 1 and g != os.getpgrp():
            try:
                os.killpg(g, signal.SIGTERM)
            except OSError:
                pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)


# --- the parts ------------------------------------------------------------------------------


def _base_env(s: StackSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FTFLOW_HOME": str(s.home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONUNBUFFERED": "1",
    })
    # ftflow uses no MLflow server jobs; they would start ~8 job-runner processes.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _prefect_server_cmd(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    env = _base_env(s)
    home = s.dir / "prefect-server"
    home.mkdir(parents=True, exist_ok=True)
    env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_UI_API_URL", s.prefect_api_url)  # the API address browsers use; set it when exposing
    env["PREFECT_SERVER_UI_ENABLED"] = "true"
    bin_ = Path(sys.executable).parent / "prefect"
    return [str(bin_), "server", "start", "--host", s.host, "--port", str(s.prefect_port), "--analytics-off"], env


def _mlflow_auth_config(s: StackSettings) -> Path:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "admin")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not password:
        raise StackError("FTFLOW_MLFLOW_AUTH=1 needs MLFLOW_TRACKING_PASSWORD (the admin password; "
                         "MLFLOW_TRACKING_USERNAME names the admin, default 'admin').")
    ini = s.dir / "mlflow-auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{s.dir / 'mlflow-auth.db'}\n"
        f"admin_username = {user}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    ini.chmod(0o600)
    return ini


def _mlflow_cmd(s: StackSettings) -> tuple[list[str], dict[str, str]]:
    env = _base_env(s)
    artifacts = s.home / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    bin_ = Path(sys.executable).parent / "mlflow"
    cmd = [str(bin_), "server", "--host", s.host, "--port", str(s.mlflow_port), "--workers", "1",
           "--backend-store-uri", s.mlflow_backend_uri, "--artifacts-destination", artifacts.as_uri()]
    if s.mlflow_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_mlflow_auth_config(s))
        key = s.dir / "mlflow-secret-key"
        if not key.exists():
            key.write_text(base64.b64encode(os.urandom(32)).decode())
            key.chmod(0o600)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", key.read_text())
        cmd += ["--app-name", "basic-auth"]
    return cmd, env


def _worker_cmd(s: StackSettings, name: str) -> tuple[list[str], dict[str, str]]:
    env = _base_env(s)
    env["PREFECT_HOME"] = str(s.home / "prefect")
    env["PREFECT_API_URL"] = s.prefect_api_url
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        env.setdefault("PREFECT_API_AUTH_STRING", os.environ["PREFECT_SERVER_API_AUTH_STRING"])
    env["MLFLOW_TRACKING_URI"] = s.mlflow_url
    env["PREFECT_LOGGING_EXTRA_LOGGERS"] = "ftflow"
    bin_ = Path(sys.executable).parent / "prefect"
    return [str(bin_), "worker", "start", "--pool", s.work_pool, "--type", "process",
            "--name", name], env


def _prefect_healthy(s: StackSettings) -> bool:
    try:
        status, _ = http("GET", f"{s.prefect_api_url}/health", headers=prefect_auth_header(), timeout=3)
        return status == 200
    except OSError:
        return False


def _mlflow_healthy(s: StackSettings) -> bool:
    try:
        status, _ = http("GET", f"{s.mlflow_url}/health", headers=mlflow_auth_header(), timeout=3)
        return status == 200
    except OSError:
        return False


def _worker_healthy(s: StackSettings) -> bool:
    r = _read_running(s)
    if r is None or not r.worker_name:
        return False
    try:
        workers = prefect_api("POST", f"/work_pools/{s.work_pool}/workers/filter", {}, s.prefect_api_url)
    except (OSError, StackError):
        return False
    return any(w.get("name") == r.worker_name and w.get("status") == "ONLINE" for w in workers)


HEALTH = {"prefect-server": _prefect_healthy, "mlflow": _mlflow_healthy, "worker": _worker_healthy}
COMMANDS = {"prefect-server": _prefect_server_cmd, "mlflow": _mlflow_cmd}


def _ensure_pool_and_gpu_limit(s: StackSettings) -> None:
    """The process work pool and the `gpu` global concurrency limit (created, or resized to FTFLOW_GPU_SLOTS)."""
    api, auth = s.prefect_api_url, prefect_auth_header()
    if http("GET", f"{api}/work_pools/{s.work_pool}", headers=auth)[0] == 404:
        status, out = http("POST", f"{api}/work_pools/", {"name": s.work_pool, "type": "process"}, auth)
        if status not in (200, 201, 409):
            raise StackError(f"could not create work pool {s.work_pool!r}: {status} {out}")
    if http("GET", f"{api}/v2/concurrency_limits/gpu", headers=auth)[0] == 404:
        status, out = http("POST", f"{api}/v2/concurrency_limits/", {"name": "gpu", "limit": s.gpu_slots}, auth)
        if status not in (200, 201, 409):
            raise StackError(f"could not create the gpu concurrency limit: {status} {out}")
    else:
        prefect_api("PATCH", "/v2/concurrency_limits/gpu", {"limit": s.gpu_slots}, api)


def _wait(name: str, s: StackSettings, pid: int, log_path: str) -> None:
    deadline = time.monotonic() + s.timeout_s
    while not HEALTH[name](s):
        if not _alive(pid, None):
            raise StackError(f"{name} exited during start-up; its log ({log_path}) ends with:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} not healthy after {s.timeout_s:.0f} s; see {log_path}:\n{_tail(log_path)}")
        time.sleep(0.5)


def _read_running(s: StackSettings) -> Running | None:
    path = s.dir / "stack.json"
    if not path.exists():
        return None
    return Running(**json.loads(path.read_text()))


def _write_running(s: StackSettings, r: Running) -> None:
    s.dir.mkdir(parents=True, exist_ok=True)
    tmp = s.dir / "stack.json.tmp"
    tmp.write_text(json.dumps(asdict(r), indent=2))
    os.replace(tmp, s.dir / "stack.json")


def up(s: StackSettings) -> Running:
    """Start what is not running and healthy; leave healthy parts alone. Raises StackError naming the part."""
    if s.host not in LOOPBACK:
        log.warning("listening on %s: the servers are reachable from other machines. Turn on "
                    "PREFECT_SERVER_API_AUTH_STRING and FTFLOW_MLFLOW_AUTH=1 first (README: Running as a service).", s.host)
    r = _read_running(s) or Running(s.prefect_api_url, s.mlflow_url, s.work_pool)
    r.prefect_api_url, r.mlflow_url, r.work_pool = s.prefect_api_url, s.mlflow_url, s.work_pool
    wanted = [p for p in PARTS if s.worker or p != "worker"]
    started: list[str] = []
    try:
        for name in ("prefect-server", "mlflow"):  # both servers start side by side
            if name in wanted and not (_alive(r.pids.get(name), r.started.get(name)) and HEALTH[name](s)):
                stop_tree(r.pids.get(name, 0), r.started.get(name))
                cmd, env = COMMANDS[name](s)
                r.pids[name], r.started[name], lp = _spawn(name, cmd, env, s)
                r.logs[name] = str(lp)
                started.append(name)
                _write_running(s, r)
        for name in started:
            _wait(name, s, r.pids[name], r.logs[name])
        _ensure_pool_and_gpu_limit(s)
        if "worker" in wanted and not (_alive(r.pids.get("worker"), r.started.get("worker")) and HEALTH["worker"](s)):
            stop_tree(r.pids.get("worker", 0), r.started.get("worker"))
            r.worker_name = f"ftflow-local-{s.prefect_port}-{time.strftime('%Y%m%d-%H%M%S')}"
            cmd, env = _worker_cmd(s, r.worker_name)
            r.pids["worker"], r.started["worker"], lp = _spawn("worker", cmd, env, s)
            r.logs["worker"] = str(lp)
            _write_running(s, r)
            _wait("worker", s, r.pids["worker"], r.logs["worker"])
    except BaseException:
        _write_running(s, r)
        raise
    _write_running(s, r)
    return r


def status(s: StackSettings) -> dict[str, str]:
    r = _read_running(s)
    out = {}
    for name in PARTS:
        if r is None or name not in r.pids:
            out[name] = "not started"
        elif not _alive(r.pids[name], r.started.get(name)):
            out[name] = f"dead (pid {r.pids[name]}); log {r.logs.get(name)}"
        else:
            out[name] = ("healthy" if HEALTH[name](s) else "running, NOT healthy") + f" (pid {r.pids[name]})"
    return out


def down(s: StackSettings) -> list[str]:
    """Stop every part `up` started (worker first, so no flow run is left behind) and their children."""
    r = _read_running(s)
    if r is None:
        return []
    stopped = []
    for name in reversed(PARTS):
        if name in r.pids:
            stop_tree(r.pids[name], r.started.get(name))
            stopped.append(name)
    (s.dir / "stack.json").unlink(missing_ok=True)
    return stopped


def env_lines(s: StackSettings) -> list[str]:
    return [
        f"export PREFECT_API_URL={s.prefect_api_url}",
        f"export MLFLOW_TRACKING_URI={s.mlflow_url}",
        f"export FTFLOW_HOME={s.home}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--host", help="listen address (default 127.0.0.1; FTFLOW_STACK_HOST)")
    ap.add_argument("--prefect-port", type=int, help="default 4200 (FTFLOW_PREFECT_PORT)")
    ap.add_argument("--mlflow-port", type=int, help="default 5000 (FTFLOW_MLFLOW_PORT)")
    ap.add_argument("--work-pool", help="default ftflow (FTFLOW_WORK_POOL)")
    ap.add_argument("--gpu-slots", type=int, help="trainings at once (FTFLOW_GPU_SLOTS, default 1)")
    ap.add_argument("--no-worker", dest="worker", action="store_false", default=None, help="servers only")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = StackSettings.from_env(host=a.host, prefect_port=a.prefect_port, mlflow_port=a.mlflow_port,
                               work_pool=a.work_pool, gpu_slots=a.gpu_slots, worker=a.worker)
    running = _read_running(s)
    if a.command != "up" and running is not None:  # check/stop what is running, whatever the defaults say now
        from urllib.parse import urlparse

        s.prefect_port = urlparse(running.prefect_api_url).port or s.prefect_port
        s.mlflow_port = urlparse(running.mlflow_url).port or s.mlflow_port
        s.work_pool = running.work_pool
        s.worker = "worker" in running.pids
    if a.command == "up":
        try:
            r = up(s)
        except StackError as err:
            log.error("stack: %s\n(`make down` stops what did start)", err)
            return 1
        log.info("Prefect UI   %s\nPrefect API  %s\nMLflow UI    %s\nwork pool    %s (worker pid %s)\nlogs         %s\n"
                 "point clients at it:\n  %s", s.prefect_url, r.prefect_api_url, r.mlflow_url, r.work_pool,
                 r.pids.get("worker", "-"), s.dir / "logs", "\n  ".join(env_lines(s)))
        return 0
    if a.command == "down":
        stopped = down(s)
        log.info("stopped: %s", ", ".join(stopped) if stopped else "nothing was running")
        return 0
    if a.command == "env":
        sys.stdout.write("\n".join(env_lines(s)) + "\n")  # for `eval "$(python -m infra.stack env)"`
        return 0
    st = status(s)
    for name, text in st.items():
        log.info("%-15s %s", name, text)
    return 0 if all(v.startswith("healthy") for k, v in st.items() if s.worker or k != "worker") else 1


if __name__ == "__main__":
    sys.exit(main())
