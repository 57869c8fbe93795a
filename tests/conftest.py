"""Shared fixtures. Every test session gets its own FTFLOW_HOME, so tests never touch `.ftflow/`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="ftflow-test-home-"))
os.environ["FTFLOW_HOME"] = str(_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# MLflow servers started by tests need no job runners (8 extra processes each on a 2-core machine).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ftflow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny Qwen2 (tokenizer + random init), built once per test session."""
    from tasks.base_model import resolve_model_path

    return Path(resolve_model_path("embedded:tiny-qwen2"))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return REPO / "data" / "demo"


@pytest.fixture(scope="session")
def noisy_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model re-drawn with larger weights, so greedy replies are not one repeated token
    (they differ per prompt, contain spaces and sometimes stop)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("noisy-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture()
def bare_versions():
    """`make(name, n)`: a registered model with n versions and no artifacts (enough for alias,
    tag, promotion and rollback logic) in the current MLflow store."""

    def make(name: str, n: int) -> None:
        import mlflow

        from infra.local import configure_environment

        configure_environment()
        client = mlflow.MlflowClient()
        client.create_registered_model(name)
        for _ in range(n):
            client.create_model_version(name, source="file:///nonexistent")

    return make


@pytest.fixture()
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A fresh MLflow SQLite store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "home"))
    return uri


@pytest.fixture(autouse=True)
def _isolate_mlflow_globals():
    """MLflow keeps the tracking URI and the active run in process globals that outlive a test's
    monkeypatched environment; reset them after every test so no test talks to another's server."""
    yield
    import sys

    if "mlflow" not in sys.modules:
        return
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    while mlflow.active_run() is not None:
        try:
            mlflow.end_run()
        except Exception:
            break
    tracking_utils._tracking_uri = None
    mlflow.tracing.reset()  # the tracer provider keeps the store it was set up with


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2.5 tokenizer and chat template (tests/realvocab.py; skips without the fixtures)."""
    from tests.realvocab import real_tokenizer_dir

    return real_tokenizer_dir(tmp_path_factory.mktemp("real-tok"), "qwen2.5")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2.5 vocabulary with Qwen3's added tokens and chat template."""
    from tests.realvocab import real_tokenizer_dir

    return real_tokenizer_dir(tmp_path_factory.mktemp("real-tok"), "qwen3")


@pytest.fixture(scope="session")
def qwen25_tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2 (hidden 64, 2 layers) on the real 151,665-token vocabulary."""
    from tests.realvocab import real_tiny_model_dir

    return real_tiny_model_dir(tmp_path_factory.mktemp("real-model"), "qwen2.5")


def pytest_sessionfinish(session, exitstatus):
    """Prefect's console log handlers keep the stream pytest captured when they were made; at
    interpreter exit Prefect stops its temporary server and logs that to the closed stream
    ("--- Logging error --- ... I/O operation on closed file"). Hand them the real stderr."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            console = getattr(handler, "console", None)
            if console is not None and hasattr(console, "file"):
                console.file = sys.__stderr__
