"""MLflow lineage: one parent run per flow run, child runs for training and each scored run.

Params are the whole resolved config (secret-looking values redacted); tags record what a number
in the registry was made from: data hash, tokenized-cache key, pipeline git commit, base model and
revision, library versions, the Prefect flow-run id.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from ftflow.utils import PROJECT_ROOT
from tasks.registry import call_with_retry  # the one MLflow retry layer (create_run is not retried: not idempotent)

log = logging.getLogger("ftflow.lineage")

REDACTED = "***"
LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "prefect", "mlflow", "datasets", "bitsandbytes")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Words that make a key secret wherever they appear (`hf_token`, `MLFLOW_TRACKING_PASSWORD`,
# `aws_secret_access_key`, `apiKey`), matched on whole words so that `tokenize`,
# `max_new_tokens` or `trained_tokens` stay visible.
SECRET_WORDS = {"password", "passwd", "pwd", "secret", "secrets", "credential", "credentials", "apikey",
                "auth", "authorization", "bearer", "cookie", "private"}
# `*_token` is secret, except the special-token names of a tokenizer (`pad_token`, `eos_token`, ...).
SPECIAL_TOKEN_WORDS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "end", "start", "im", "max", "num", "special"}
_URL_USERINFO = re.compile(r"(\w+://[^/\s:@]+:)[^/\s@]+@")


def _words(key: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower())


def is_secret_key(key: str) -> bool:
    """True for keys that name a credential: `token`, `hf_token`, `api_key`, `password`, `client_secret`."""
    words = _words(key)
    if not words:
        return False
    if SECRET_WORDS & set(words):
        return True
    if words[-1] == "key" and len(words) > 1 and words[-2] in {"api", "access", "secret", "private", "auth", "signing"}:
        return True
    return words[-1] == "token" and (len(words) == 1 or words[-2] not in SPECIAL_TOKEN_WORDS)


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the environment's credential variables (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, ...), longest first."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if is_secret_key(k) and len(v) >= 6}, key=len, reverse=True)


def _redact_text(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED)
    return _URL_USERINFO.sub(rf"\g<1>{REDACTED}@", text)  # https://user:PASSWORD@host


def redact(d: Any, _secrets: list[str] | None = None) -> Any:
    """A copy of `d` safe to log: secrets replaced by `***`, at any depth.

    Three rules: the value of a key that names a credential (`is_secret_key`); any occurrence of
    the value of a credential environment variable (a token pasted into a path or URL); the
    password of a URL (`scheme://user:PASSWORD@host`).
    """
    secrets = secret_env_values() if _secrets is None else _secrets
    if isinstance(d, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v, secrets)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [redact(x, secrets) for x in d]
    if isinstance(d, str):
        return _redact_text(d, secrets)
    return d


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def start_parent_run(experiment_id: str, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    all_tags = {
        "ftflow.git_commit": git_commit(),
        **{f"ftflow.version.{k}": v for k, v in library_versions().items()},
        **tags,
    }
    # tag values can carry URLs (the Prefect UI link): same text rules as params
    run = client.create_run(experiment_id, run_name=run_name, tags={k: redact(str(v)) for k, v in all_tags.items()})
    params = [Param(k, str(v)[:6000]) for k, v in flatten(redact(config)).items()]
    for i in range(0, len(params), 100):
        call_with_retry(client.log_batch, run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def start_child_run(experiment_id: str, parent_run_id: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    from mlflow import MlflowClient

    run = MlflowClient().create_run(
        experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id, **(tags or {})}
    )
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    call_with_retry(MlflowClient().set_terminated, run_id, status=status)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    from mlflow import MlflowClient

    call_with_retry(MlflowClient().log_text, run_id, text, artifact_file)


def log_dict(run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    from mlflow import MlflowClient

    call_with_retry(MlflowClient().log_dict, run_id, redact(data), artifact_file)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        call_with_retry(client.set_tag, run_id, k, redact(str(v)))


def loss_plot_png(log_history: list[dict[str, Any]]) -> bytes:
    """A loss (and learning-rate) curve from the Trainer's log history, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    loss = [h["loss"] for h in log_history if "loss" in h]
    lr = [h.get("learning_rate") for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, marker=".", color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (trained tokens)")
    ax.grid(alpha=0.3)
    if any(v is not None for v in lr):
        ax2 = ax.twinx()
        ax2.plot(steps, lr, color="tab:orange", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.set_title("Training loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def log_loss_plot(run_id: str, log_history: list[dict[str, Any]], out_dir: Path) -> Path:
    from mlflow import MlflowClient

    path = out_dir / "loss_curve.png"
    path.write_bytes(loss_plot_png(log_history))
    MlflowClient().log_artifact(run_id, str(path), artifact_path="training")
    return path


def length_histogram_png(hist: dict[str, list[int]], title: str = "Tokenized sample lengths") -> bytes:
    """Bar chart of the tokenize stage's length histogram ({"edges": [...], "counts": [...]})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge", edgecolor="white")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def log_png(run_id: str, png: bytes, artifact_file: str, scratch_dir: Path) -> None:
    from mlflow import MlflowClient

    scratch_dir.mkdir(parents=True, exist_ok=True)
    path = scratch_dir / Path(artifact_file).name
    path.write_bytes(png)
    call_with_retry(MlflowClient().log_artifact, run_id, str(path), artifact_path=str(Path(artifact_file).parent))
