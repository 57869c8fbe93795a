"""Where a run's records live when no servers are configured.

Defaults, all under the one project-local state folder (`ftflow.utils.state_dir()`):
- MLflow: SQLite store `mlflow.db` and artifacts in `mlartifacts/`, unless `MLFLOW_TRACKING_URI` is set;
- Prefect: its ephemeral local mode with `PREFECT_HOME` in `prefect/`, unless `PREFECT_API_URL` is set;
- no telemetry, nothing fetched from the Hugging Face Hub for local model folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from ftflow.utils import state_dir


def configure_environment() -> dict[str, str]:
    """Set the environment defaults above (never overriding what the user set). Returns them."""
    home = state_dir()
    defaults = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false" if not os.environ.get("PREFECT_API_URL") else "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GIT_PYTHON_REFRESH": "quiet",
        # ftflow's own loggers (stage logic, rank 0's output) go to the Prefect run log too.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "ftflow,tasks",
        # The ephemeral server's 20 s default start-up limit is too short on a busy 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # One retry layer: ftflow's call_with_retry (FTFLOW_MLFLOW_RETRY_SECONDS). MLflow's own HTTP
        # retries (7 by default, with backoff) would multiply with it, so they are off.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        # MLflow's HTTP pool holds 10 connections by default; the flow's threads (GenAI evaluation,
        # async logging) use more, and urllib3 then warns "Connection pool is full" per request.
        "MLFLOW_HTTP_POOL_MAXSIZE": "32",
        # Log files are plain text: no ANSI colour codes from Prefect's console handler.
        "PREFECT_LOGGING_COLORS": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in defaults}


def artifact_root() -> Path:
    return state_dir() / "mlartifacts"


def ensure_experiment(name: str) -> str:
    """The MLflow experiment id for `name`, created with artifacts in the state folder if new."""
    import mlflow

    configure_environment()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = os.environ["MLFLOW_TRACKING_URI"]
    location = artifact_root().as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
