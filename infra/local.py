"""Where a run's records live when no servers are configured.

Defaults, all under the one project-local state folder (`ftflow.utils.state_dir()`):
- MLflow: SQLite store `mlflow.db` and artifacts in `mlartifacts/`, unless `MLFLOW_TRACKING_URI` is set;
- Prefect: its ephemeral local mode with `PREFECT_HOME` in `prefect/`, unless `PREFECT_API_URL` is set;
- no telemetry, nothing fetched from the Hugging Face Hub for local model folders;
- one retry layer for MLflow calls (its own HTTP retries off), plain-text logs, two known warnings dropped.

`RunLog` is the full log of one `ftflow run` (a plain-text file in the run's output folder) and the
quiet console that goes with it: no tracebacks on the terminal unless --debug.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from ftflow.utils import state_dir


def configure_environment() -> dict[str, str]:
    """Set the environment defaults above (never overriding what the user set). Returns them."""
    home = state_dir()
    defaults = {
        "MLFLOW_TRACKING_URI": default_tracking_uri(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false" if not os.environ.get("PREFECT_API_URL") else "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # This process forks (Prefect, multiprocessing); a tokenizer thread pool used before a fork can
        # deadlock the child, and an explicit setting keeps tokenizers from switching it off there. The
        # big encode runs in its own never-forking child, which sets it true on 2+ cores
        # (tasks.encode_process.child_environment).
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
    _drop_known_noise()
    return {k: os.environ[k] for k in defaults}


def start_prefect_server_early() -> Callable[[], None]:
    """Start Prefect's temporary API server now, in a thread; returns the function that waits for it.

    Without `PREFECT_API_URL`, Prefect starts a temporary server (a uvicorn subprocess: 4 s on a
    quiet 2-core host, 10 s on a fresh state folder, which migrates its database) the first time
    the flow calls its API, and the process waits for it. Started here, it comes up on the other
    core while this process imports what the stages need (`preload_stage_libraries`, ~5 s). It is
    Prefect's own server object (`SubprocessASGIServer`, one per process), so the flow's client
    finds it running; if it fails to start, the flow's own start tries again and reports."""
    if os.environ.get("PREFECT_API_URL"):
        return lambda: None
    import threading

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    server = SubprocessASGIServer()

    def start() -> None:
        try:
            server.start()
        except Exception as err:  # noqa: BLE001 - the flow's client starts it again and reports the error
            logging.getLogger("ftflow").debug("early start of Prefect's temporary server failed: %s", err)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread.join


def preload_stage_libraries() -> None:
    """Import what the stages import anyway (torch, transformers' model code, datasets, MLflow's
    SQL store), while Prefect's server starts: the same work, earlier, overlapped."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Two warnings every run printed that tell the user nothing they can act on; each dropped by its
# exact logger and message (every other warning of those loggers stays):
# - bitsandbytes, on import (peft imports it), on CPUs with AVX512-BF16: its optional CPU 4-bit kernel
#   is fetched from the Hugging Face Hub by the `kernels` package. ftflow never runs code fetched from
#   the hub; bitsandbytes then uses its own kernel.
# - transformers, when MLflow's llm/v1/chat wrapper validates the input example at registration:
#   MLflow hard-codes `decode(..., clean_up_tokenization_spaces=True)` (mlflow/transformers/
#   llm_inference_utils.py), which transformers already ignores for BPE tokenizers such as Qwen's;
#   ftflow's own tokenizers are saved with clean_up_tokenization_spaces=false.
_KNOWN_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.tokenization_utils_tokenizers": "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",
}


def _drop_known_noise() -> None:
    for name, prefix in _KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def default_tracking_uri(home: Path) -> str:
    """The MLflow store of a run when MLFLOW_TRACKING_URI is not set: SQLite in the state folder."""
    return f"sqlite:///{home / 'mlflow.db'}"


def tracking_uri(home: Path) -> str:
    """The MLflow store a run will use, without changing the environment."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(home)


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


# --------------------------------------------------------------------------- the run log

# Prefect's own echo of a failure (the task's and the flow's "... failed with exception" with their
# tracebacks, "Finished in state Failed(...)"): the command prints one message instead.
_ECHO_PREFIXES = ("Finished in state", "Task run failed", "Flow run failed", "Encountered exception")


class _PlainFileHandler(logging.FileHandler):
    """A log file that never prints "--- Logging error ---": a write that fails (disk full) marks it failed."""

    failed: OSError | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        import sys

        err = sys.exc_info()[1]
        self.failed = err if isinstance(err, OSError) else OSError(str(err))


class _StageWatch(logging.Filter):
    """Remembers the Prefect task that last logged an error: the stage that failed."""

    stage: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and getattr(record, "task_name", None):
            self.stage = record.task_name
        return True


class _QuietConsole(logging.Filter):
    """Console without tracebacks: drops Prefect's echo of a failure, keeps every other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        msg = record.getMessage()
        if msg.startswith(("Finished in state Failed", "Finished in state Crashed")):
            return False
        return not (record.levelno >= logging.ERROR and (record.exc_info or msg.startswith(_ECHO_PREFIXES)))


class _NoTraceback(logging.Formatter):
    """Formats a copy of the record without its traceback (the log file keeps it)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        import copy

        r = copy.copy(record)
        r.exc_info, r.exc_text, r.stack_info = None, None, None
        return self.inner.format(r)


class RunLog:
    """The full log of one `ftflow run` in a plain-text file (no colour codes, every traceback), and a
    quiet console: without `debug`, the console shows no tracebacks and not Prefect's echo of a
    failure, so the command's own message is the one a person reads.

    The file starts in `folder` and `move_to()` puts it into the run's output folder once its id is
    known. Call after Prefect has configured logging (importing a flow does), then `close()`."""

    NAME = "ftflow-run.log"

    def __init__(self, folder: Path, debug: bool = False):
        import time

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"ftflow-run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
        self.handler = _PlainFileHandler(self.path, encoding="utf-8", delay=False)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.watch = _StageWatch()
        self.handler.addFilter(self.watch)
        root = logging.getLogger()
        root.handlers.insert(0, self.handler)  # before the console: it sees every record first
        self._console: list[tuple[logging.Handler, logging.Formatter | None]] = []
        self._quiet = _QuietConsole()
        if not debug:
            for h in root.handlers[1:]:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    self._console.append((h, h.formatter))
                    h.addFilter(self._quiet)
                    h.setFormatter(_NoTraceback(h.formatter))

    def record_failure(self, err: BaseException, what: str) -> None:
        """The error that ended the command, with its traceback, into the file only (not the console,
        and not Prefect's API handler, which has no flow run to file it under by now)."""
        record = logging.LogRecord("ftflow.run", logging.ERROR, __file__, 0, "%s", (what,),
                                   (type(err), err, err.__traceback__))
        self.handler.handle(record)

    @property
    def failed_stage(self) -> str | None:
        return self.watch.stage

    @property
    def write_error(self) -> OSError | None:
        return self.handler.failed

    def move_to(self, folder: Path) -> Path:
        """Rename the file into `folder` (as ftflow-run.log); it stays where it is if that fails."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / self.NAME
            os.replace(self.path, target)  # the open handler keeps writing to the renamed file
            self.path = target
        except OSError:
            pass
        return self.path

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        for h, formatter in self._console:
            h.removeFilter(self._quiet)
            h.setFormatter(formatter)
