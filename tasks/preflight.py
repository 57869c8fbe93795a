"""Checks that run before any heavy work, and before Prefect or MLflow start: each problem gets one
paragraph naming the file, key or URL and what to do, instead of a stack trace ten minutes into a run.

Only cheap checks: files exist and are of a type the data stage reads, the model folder has weights
and needs no remote code (unless allowed), the tokenizer can render chats when
`tokenize.template: auto`, `max_length` fits the model's context; the state folder (`FTFLOW_HOME`)
and a local MLflow store can be written; a tracking server answers one short probe (seconds, not
the minutes of stacked retries); the disk holds an estimate of the run's outputs. Hub ids are not
fetched here (that would need the network); `from_pretrained` reports those.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ftflow.config import PipelineConfig, project_path, resolve_data_path
from ftflow.utils import PROJECT_ROOT
from tasks.base_model import EMBEDDED_PREFIX

# One probe of a tracking server, in seconds: an unreachable server is reported before anything starts.
PROBE_TIMEOUT_S = 5.0
# FTFLOW_PREFLIGHT_DISK=off skips the free-space check (an estimate; it may be too cautious for a setup).
DISK_CHECK_ENV = "FTFLOW_PREFLIGHT_DISK"
GB = 1024**3

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "adapter_model.safetensors")


class PreflightError(ValueError):
    pass


def _data_problems(cfg: PipelineConfig) -> list[str]:
    problems = []
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for p in paths:
            path = resolve_data_path(cfg, p)
            if isinstance(path, str):  # hf:NAME — resolved by the data stage
                continue
            if not path.exists() and not glob.glob(str(path)):
                problems.append(
                    f"{key}: {p!r} does not exist (looked for {path}). Relative paths are read from the "
                    f"config file's folder ({cfg.base_dir}); fix the path or the file name."
                )
                continue
            from tasks.convert import InputError, resolve_inputs

            try:
                resolve_inputs([path])  # the data stage's own rules: suffixes, folders, globs
            except InputError as err:
                problems.append(f"{key}: {p!r}: {err}")
    return problems


def _model_problems(cfg: PipelineConfig) -> list[str]:
    m = cfg.model
    if m.name_or_path.startswith(EMBEDDED_PREFIX):
        return []
    path = Path(m.name_or_path).expanduser()
    if not path.exists():
        if m.name_or_path.startswith((".", "/", "~")):
            return [f"model.name_or_path: {m.name_or_path!r} looks like a path but does not exist."]
        from tasks.base_model import hub_model_problem  # a hub id: cached, or the hub answers (one probe)

        problem = hub_model_problem(m.name_or_path, m.revision)
        return [f"model.name_or_path: {problem}"] if problem else []
    problems = []
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return [f"model.name_or_path: {path} has no config.json; point it at a Hugging Face model folder."]
    config = json.loads(cfg_file.read_text())
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        bins = [q.name for q in path.glob("*.bin")] + [q.name for q in path.glob("*.pt")]
        hint = (f" It holds {bins[:2]} (pickle files): ftflow loads safetensors only — convert them with "
                "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment.") if bins else ""
        problems.append(f"model.name_or_path: {path} has no weights (*.safetensors).{hint}")
    if config.get("auto_map") and not m.trust_remote_code:
        problems.append(
            f"model.name_or_path: {path} needs custom Python code from the model repository (config.json has "
            f"auto_map: {sorted(config['auto_map'])}). ftflow does not run remote code by default. Read the code; "
            "if you trust it, set model.trust_remote_code: true."
        )
    ctx = config.get("max_position_embeddings")
    if ctx and cfg.tokenize.max_length > ctx:
        problems.append(
            f"tokenize.max_length={cfg.tokenize.max_length} is larger than the model's context "
            f"(max_position_embeddings={ctx} in {cfg_file}); set tokenize.max_length <= {ctx}."
        )
    if cfg.tokenize.template == "auto" and cfg.tokenize.objective == "sft":
        tok_cfg = path / "tokenizer_config.json"
        has_template = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
        if not has_template and tok_cfg.is_file():
            has_template = bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        if not has_template:
            problems.append(
                f"tokenize.template: auto, but the tokenizer in {path} has no chat template. Set tokenize.template "
                "to chatml, llama2, plain, or a path to a .jinja file."
            )
    return problems


def _train_problems(cfg: PipelineConfig) -> list[str]:
    t = cfg.train
    if t.deepspeed and not project_path(t.deepspeed).is_file():
        return [f"train.deepspeed: {t.deepspeed} does not exist; use one of configs/deepspeed/*.json or null."]
    return []


def _writable_dir_problem(folder: Path, what: str, fix: str) -> str | None:
    """None if a file can be created in `folder` (made if missing); else one sentence naming it.

    A real write, not os.access: root passes every permission check, not a read-only filesystem."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-preflight-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{what} {folder} cannot be written ({err.strerror or err}); {fix}"
    return None


def _home() -> Path:
    """FTFLOW_HOME as `ftflow.utils.state_dir()` reads it, without creating it."""
    return Path(os.environ.get("FTFLOW_HOME") or PROJECT_ROOT / ".ftflow").expanduser()


def _home_problems() -> list[str]:
    home = _home()
    problem = _writable_dir_problem(
        home, "FTFLOW_HOME:", "set FTFLOW_HOME to a folder you can write (it holds MLflow, Prefect, caches and outputs).")
    return [problem] if problem else []


def probe_tracking_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One GET of `<uri>/health` with a short timeout. None when the server answers (any HTTP status:
    a 401 still means it is there); else why it could not be reached."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, socket.timeout) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"no answer within {timeout_s:g} s"
        return str(getattr(reason, "strerror", None) or reason)


def _mlflow_problems(uri: str | None) -> list[str]:
    """The tracking store the run will use (MLFLOW_TRACKING_URI, set by infra.local when unset)."""
    if not uri:
        return []
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        why = probe_tracking_server(uri)
        if why:
            return [f"MLFLOW_TRACKING_URI: the MLflow tracking server {uri} is unreachable ({why}). Start it "
                    "(`make up`, or `mlflow server ...`), fix the URL, or unset MLFLOW_TRACKING_URI to use the "
                    "local SQLite store under FTFLOW_HOME."]
        return []
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is None or str(db) in ("", ":memory:"):
            return []
        fix = ("make it writable, or point MLFLOW_TRACKING_URI at a writable store "
               "(unset it to use FTFLOW_HOME/mlflow.db).")
        problem = _writable_dir_problem(db.parent, f"MLFLOW_TRACKING_URI {uri}: the folder", fix)
        if problem is None and db.exists():
            try:
                with open(db, "r+b"):  # opened for writing, nothing written
                    pass
            except OSError as err:
                problem = f"MLFLOW_TRACKING_URI {uri}: the store {db} is read-only ({err.strerror or err}); {fix}"
        return [problem] if problem else []
    return []


def _folder_bytes(path: Path, patterns: tuple[str, ...]) -> int:
    return sum(q.stat().st_size for pat in patterns for q in path.glob(pat) if q.is_file())


def estimate_output_bytes(cfg: PipelineConfig) -> tuple[int, str]:
    """A rough upper estimate of what a run writes under FTFLOW_HOME, and how it was reckoned.

    P parameters (from the local weights: bytes / 2 for 16-bit folders, / 4 for fp32). Full training:
    each checkpoint kept (train.save_total_limit) and the final state hold weights + fp32 master + two
    Adam moments (~16 B/param), the export and its MLflow copy 4 B/param each. LoRA / Q-LoRA: the merged
    export and its MLflow copy (8 B/param) when train.lora.merge, else a few % of that. Data: the inputs
    4x (canonical JSONL, rejects, tokenized cache). Hub ids whose weights are not local count data only."""
    data = 0
    for paths in (cfg.data.train, cfg.data.eval):
        for p in paths:
            path = resolve_data_path(cfg, p)
            if isinstance(path, str):
                continue
            for f in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else map(Path, glob.glob(str(path)))):
                if f.is_file():
                    data += f.stat().st_size
    weights, params = 0, 0
    folder = Path(cfg.model.name_or_path).expanduser()
    if not cfg.model.name_or_path.startswith(EMBEDDED_PREFIX) and folder.is_dir():
        weights = _folder_bytes(folder, ("*.safetensors",))
        dtype = ""
        if (folder / "config.json").is_file():
            try:
                c = json.loads((folder / "config.json").read_text())
                dtype = str(c.get("dtype") or c.get("torch_dtype") or "")
            except (OSError, ValueError):
                pass
        params = weights // (4 if dtype in ("float32", "") else 2)
    t = cfg.train
    if t.mode == "full":
        model = params * (16 * (t.save_total_limit + 1) + 8)
    else:
        model = params * 8 if t.lora.merge else params * 8 // 20
    how = (f"~{params / 1e9:.2f}B parameters, {t.mode} training, {t.save_total_limit} checkpoint(s) kept; "
           f"{data / GB:.2f} GB of input data")
    return int((model + 4 * data) * 1.1), how


def _disk_problems(cfg: PipelineConfig) -> list[str]:
    if os.environ.get(DISK_CHECK_ENV, "").lower() in ("0", "off", "false", "no"):
        return []
    home = _home()
    if not home.exists():
        return []
    need, how = estimate_output_bytes(cfg)
    free = shutil.disk_usage(home).free
    if free < need:
        return [f"disk: the run's outputs need about {need / GB:.1f} GB under {home} ({how}), and only "
                f"{free / GB:.1f} GB are free. Free space, set FTFLOW_HOME to a larger disk, keep fewer "
                f"checkpoints (train.save_total_limit), or skip this estimate with {DISK_CHECK_ENV}=off."]
    return []


def check(cfg: PipelineConfig, *, environment: bool = True) -> None:
    """Raise PreflightError listing every problem found (not just the first).

    `environment` adds the checks of this machine: FTFLOW_HOME and the MLflow store writable, the
    tracking server reachable (MLFLOW_TRACKING_URI), free disk space against `estimate_output_bytes`."""
    problems = _data_problems(cfg) + _model_problems(cfg) + _train_problems(cfg)
    if environment:
        home = _home_problems()
        problems += home
        if not home:
            from infra.local import tracking_uri

            problems += _mlflow_problems(tracking_uri(_home().resolve())) + _disk_problems(cfg)
    if problems:
        raise PreflightError("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))
