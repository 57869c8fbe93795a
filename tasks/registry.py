"""The MLflow model registry stage: register a trained model, decide and apply promotions.

One registered model (`registry.model_name`) holds every fine-tuned version. Two aliases carry the
state a deployment reads:
- `challenger`: the newest registered version, set by `register_model`;
- `champion`: the version that serves, set only by `apply_promotion` / `promote_version` / `rollback_champion`.

What people filter by is written as version tags, so the registry itself is the audit log
(`ftflow.promotion.{promote,reason,who,why,previous_champion}`, `ftflow.rollback.*`, `ftflow.eval.*`);
the scorecard a decision was based on (metrics against the compared model, data, base model) is the
version's description, a Markdown table (`version_scorecard`). Rollback follows the
`ftflow.promotion.previous_champion` tag that every promotion leaves on the version it promoted.

What a version holds depends on the export (tag `ftflow.export`, also in the logged model's metadata):
- `full`: the fine-tuned model (weights, tokenizer, chat template);
- `adapter` (LoRA / Q-LoRA, merge=False): only the PEFT adapter and the tokenizer. The base is
  referenced, not copied: `ftflow.base_model` (a hub id, `embedded:NAME` or a local folder) and
  `ftflow.base_model_revision` (the hub commit) are tags and metadata, and the adapter's
  `adapter_config.json` names the same base and revision, so `PeftModel.from_pretrained` works on any
  machine that can get the base. MLflow's transformers flavor records where the base lies on this
  machine (`local_base_model_path`), so `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` serves it
  here; elsewhere, `mlflow.transformers.load_model(uri, base_model_path=LOCAL_COPY)` or
  `ftflow eval/generate --model models:/NAME@ALIAS` (which resolves the base by its id) load it;
- `merged` (merge=True): the merged full model, loadable like `full`; the adapter it came from is
  logged in the registering run under `adapter/` (tag `ftflow.adapter_uri`).

All calls use the tracking URI in the environment (`infra.local.configure_environment()`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_FINGERPRINT = "ftflow.fingerprint"
TAG_RUN_ID = "ftflow.run_id"
TAG_EVAL_RUN = "ftflow.eval.run_id"  # set by `record_eval`: the version has a scored inference run
TAG_EVAL_METRIC = "ftflow.eval.metric."  # + metric name
TAG_PROMO = "ftflow.promotion."
TAG_PREVIOUS = TAG_PROMO + "previous_champion"
TAG_ROLLBACK = "ftflow.rollback."
TAG_EXPORT = "ftflow.export"  # full | adapter | merged
TAG_BASE = "ftflow.base_model"
TAG_BASE_REVISION = "ftflow.base_model_revision"
TAG_ADAPTER_URI = "ftflow.adapter_uri"  # merged versions: the adapter logged beside them
ADAPTER_ARTIFACT = "adapter"  # run artifact folder of a merged version's adapter
NO_REVISION = "none"  # tag value when the base has no hub revision (local folders, embedded models)

# An input example small enough that the pyfunc validation at log time stays quick.
CHAT_INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}


# --------------------------------------------------------------------------- retries


def _is_transient(err: BaseException) -> bool:
    """Worth another try: a server-side or throttling error, a dropped connection, a locked SQLite file.

    Never a 4xx-style error (bad request, not found, already exists): repeating it cannot help.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    try:
        import requests

        if isinstance(err, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests ships with mlflow
        pass
    return isinstance(err, (ConnectionError, TimeoutError))


# The one retry layer for MLflow calls. MLflow's own HTTP retries are off (infra.local sets
# MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) and no Prefect task retries an MLflow call, so attempts never
# multiply: one call waits at most FTFLOW_MLFLOW_RETRY_SECONDS in total between its attempts.
RETRY_BUDGET_ENV = "FTFLOW_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_BUDGET_S = 30.0
MAX_RETRY_DELAY_S = 8.0


def retry_budget_s() -> float:
    """Total seconds one MLflow call may spend waiting between attempts (FTFLOW_MLFLOW_RETRY_SECONDS, default 30; 0 = no retry)."""
    raw = os.environ.get(RETRY_BUDGET_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_RETRY_BUDGET_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", RETRY_BUDGET_ENV, raw, DEFAULT_RETRY_BUDGET_S)
        return DEFAULT_RETRY_BUDGET_S


def call_with_retry(fn: Callable[..., T], *args: Any, budget_s: float | None = None, base_delay: float = 0.5,
                    **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried on transient errors with exponential backoff (0.5 s, 1 s, 2 s, ... at most
    8 s, + jitter) while the total wait stays within `budget_s` (default: `retry_budget_s()`).

    The one rule for every MLflow call of the flow process. Use only for calls that are safe to repeat.
    """
    budget = retry_budget_s() if budget_s is None else budget_s
    waited, attempt = 0.0, 0
    while True:
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            delay = min(MAX_RETRY_DELAY_S, base_delay * 2 ** (attempt - 1)) * (1 + 0.25 * random.random())
            if not _is_transient(err) or waited + delay > budget:
                raise
            log.warning("MLflow call %s failed (%s); retry %d in %.1fs (%.0f of %.0f s retry budget left)",
                        getattr(fn, "__name__", fn), _one_line(err), attempt, delay, budget - waited, budget)
            time.sleep(delay)
            waited += delay


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _client():
    import mlflow

    from infra.local import configure_environment

    configure_environment()
    return mlflow.MlflowClient()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- registration


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    existed: bool  # True when a version with the same fingerprint was already registered
    model_uri: str  # models:/NAME/VERSION


def _find_by_fingerprint(client, model_name: str, fingerprint: str):
    """The newest READY version of `model_name` tagged with `fingerprint` whose artifacts were fully logged."""
    query = f"name = '{_quote(model_name)}' and tags.`{TAG_FINGERPRINT}` = '{_quote(fingerprint)}'"
    versions = call_with_retry(client.search_model_versions, query)
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if mv.status == "READY" and _artifacts_complete(client, mv):
            return mv
    return None


def _first_with_fingerprint(client, model_name: str, fingerprint: str):
    """The lowest-numbered version tagged with `fingerprint` that did not fail, whatever its state:
    the one every concurrent registrar of the same model agrees to keep."""
    query = f"name = '{_quote(model_name)}' and tags.`{TAG_FINGERPRINT}` = '{_quote(fingerprint)}'"
    versions = [v for v in call_with_retry(client.search_model_versions, query) if v.status != "FAILED_REGISTRATION"]
    return min(versions, key=lambda v: int(v.version), default=None)


def _artifacts_complete(client, mv) -> bool:
    """A LoggedModel is READY only after all its artifacts were uploaded (FAILED if logging raised)."""
    model_id = logged_model_id(mv)
    if not model_id:
        return True  # registered from a run path (pre-MLflow-3 style): nothing more to check
    try:
        status = call_with_retry(client.get_logged_model, model_id).status
    except Exception as err:  # the logged model was deleted
        log.warning("version %s of %s: logged model %s unreadable (%s)", mv.version, mv.name, model_id, err)
        return False
    return str(status).upper().endswith("READY")


def logged_model_id(mv) -> str | None:
    """The LoggedModel id behind a version (`m-...`); the REST store leaves `model_id` empty, the source holds it."""
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return model_id
    source = str(getattr(mv, "source", "") or "")
    rest = source[len("models:/"):] if source.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None


def _quote(s: str) -> str:
    return s.replace("'", "\\'")


def pip_requirements() -> list[str]:
    """Pinned serving requirements of a logged model. Explicit, so MLflow never adds torchvision."""
    import torch
    import transformers

    return [
        f"torch=={torch.__version__.split('+')[0]}",  # drop local tags like +cpu / +cu128
        f"transformers=={transformers.__version__}",
        "accelerate",
        "safetensors",
    ]


class _InRun:
    """Make `run_id` the active MLflow run for a block, and leave its status as it was afterwards.

    `mlflow.start_run(run_id=...)` marks a resumed run FINISHED on exit; the flow that owns the run
    decides when it finishes, so a RUNNING run stays RUNNING.
    """

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.started = False
        self.status = None

    def __enter__(self):
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            return active
        self.status = call_with_retry(mlflow.MlflowClient().get_run, self.run_id).info.status
        self.started = True
        # another active run in this thread (e.g. a parent run): resume ours on top of it
        return mlflow.start_run(run_id=self.run_id, nested=active is not None)

    def __exit__(self, exc_type, exc, tb):
        import mlflow

        if self.started:  # even on an error: the flow that owns the run decides whether it failed
            mlflow.end_run(status=self.status)
        return False


@dataclass
class BaseModelRef:
    """Where an adapter's base model comes from.

    `name` is portable (a hub id, `embedded:NAME`, or an absolute local folder); `revision` is the hub
    commit of the copy used here (None for local folders and embedded models); `local_dir` holds the
    base's files on this machine (None when a hub model is not in the local cache).
    """

    name: str
    revision: str | None
    local_dir: str | None


def base_model_ref(name_or_path: str, revision: str | None = None) -> BaseModelRef:
    """Resolve `model.name_or_path` / `model.revision` to a portable reference plus a local copy.

    A hub id is looked up in the local Hugging Face cache only (training put it there); its revision
    becomes the commit of that snapshot, so a pinned branch name is recorded as the exact commit.
    """
    from tasks.base_model import EMBEDDED_PREFIX, resolve_model_path

    local = resolve_model_path(name_or_path)
    if Path(local).is_dir():
        name = name_or_path if name_or_path.startswith(EMBEDDED_PREFIX) else local
        return BaseModelRef(name, None, local)
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception as err:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        log.warning("base model %s (revision %s) is not in the local Hugging Face cache: %s",
                    name_or_path, revision or "default", err)
        return BaseModelRef(name_or_path, revision, None)
    return BaseModelRef(name_or_path, Path(snapshot).name, snapshot)


def export_kind(model_dir: Path) -> str:
    """`full`, `merged` (full model + `adapter/`) or `adapter` (a PEFT adapter folder) — see the module doc."""
    if (model_dir / "config.json").is_file():
        return "merged" if (model_dir / "adapter" / "adapter_config.json").is_file() else "full"
    if (model_dir / "adapter_config.json").is_file():
        return "adapter"
    raise FileNotFoundError(f"{model_dir} is neither a Hugging Face model folder (config.json) nor a PEFT "
                            "adapter folder (adapter_config.json); pass the folder the consolidate stage wrote")


def _adapter_base(adapter_dir: Path) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) that an adapter's own adapter_config.json names."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if not cfg.get("base_model_name_or_path"):
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} names no base model; pass base_model=")
    return cfg["base_model_name_or_path"], cfg.get("revision")


def register_model(
    model_dir: str | Path,
    *,
    model_name: str,
    run_id: str,
    fingerprint: str,
    tags: dict[str, str],
    base_model: str | None = None,
    base_model_revision: str | None = None,
) -> RegisteredVersion:
    """Log the export folder `model_dir` into run `run_id` and register it as a version of `model_name`.

    `model_dir` is a full model, a merged LoRA export (full model + `adapter/`) or a PEFT adapter
    folder (`export_kind`); what is logged for each is in the module doc. `base_model` /
    `base_model_revision` are the config's `model.name_or_path` / `model.revision`: the base that
    an adapter version references (default: the base its adapter_config.json names).

    Idempotent on `fingerprint` (a content hash of the model): a version already tagged with it is
    returned (`existed=True`) and nothing is logged again. Either way, alias `challenger` ends up on
    the returned version. The alias is set last, after the version is READY and its artifacts are
    complete, so a registration that fails half-way never leaves an alias on a missing model.
    """
    import mlflow

    client = _client()
    model_dir = Path(model_dir)
    kind = export_kind(model_dir)

    existing = _find_by_fingerprint(client, model_name, fingerprint)
    if existing is not None:
        log.info("model %s version %s already holds fingerprint %s; not logging again",
                 model_name, existing.version, fingerprint[:12])
        call_with_retry(client.set_registered_model_alias, model_name, CHALLENGER, existing.version)
        return RegisteredVersion(model_name, str(existing.version), existing.run_id or "", True,
                                 f"models:/{model_name}/{existing.version}")

    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base_model is None and kind != "full":
        base_model, base_model_revision = _adapter_base(model_dir if kind == "adapter" else model_dir / "adapter")
    base = base_model_ref(base_model, base_model_revision) if base_model else None
    ref_tags = {TAG_EXPORT: kind}
    if base is not None:
        ref_tags.update({TAG_BASE: base.name, TAG_BASE_REVISION: base.revision or NO_REVISION})

    # An explicit card stops MLflow from asking the Hugging Face Hub for one.
    card = ModelCard(f"---\nlibrary_name: transformers\n---\n# {model_name}\n\nFine-tuned by ftflow (run {run_id}).\n")
    requirements = pip_requirements()
    if kind == "adapter":
        if base.local_dir is None:
            raise FileNotFoundError(f"base model {base.name} of adapter {model_dir} is not on this machine; "
                                    "download it (or run the training here) before registering the adapter")
        from peft import PeftModel, __version__ as peft_version

        # Only the adapter is stored; MLflow records the base's local folder (base_model_path) for
        # pyfunc, and the adapter config names the portable base id and revision.
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.local_dir, dtype="auto"), model_dir)
        adapter_cfg = model.peft_config[model.active_adapter]
        adapter_cfg.base_model_name_or_path, adapter_cfg.revision = base.name, base.revision
        extra = {"base_model_path": base.local_dir}
        requirements.append(f"peft=={peft_version}")
    else:
        # Full and merged models are logged from the folder itself: MLflow copies the files and never
        # loads the weights (a 70B export is not read into memory a second time). The dtype the
        # folder was saved in is what pyfunc loads it back in.
        model = str(model_dir)
        saved_dtype = json.loads((model_dir / "config.json").read_text()).get("dtype")
        extra = {"torch_dtype": getattr(torch, saved_dtype)} if saved_dtype in ("float32", "bfloat16", "float16") else {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with _InRun(run_id), _pipeline_classes_resolved():
        if kind == "merged":  # logged before the version exists: a failure here leaves no version behind
            ref_tags[TAG_ADAPTER_URI] = _log_adapter_artifact(model_dir / "adapter", tokenizer, base, run_id)
        info = mlflow.transformers.log_model(
            model if isinstance(model, str) else {"model": model, "tokenizer": tokenizer},
            name="model",
            task="llm/v1/chat",  # pyfunc takes OpenAI-style chat input and applies the chat template
            input_example=CHAT_INPUT_EXAMPLE,
            pip_requirements=requirements,
            model_card=card,
            metadata=ref_tags,
            **extra,
        )
    del model

    version_tags = {**{k: str(v) for k, v in tags.items()}, **ref_tags, TAG_FINGERPRINT: fingerprint, TAG_RUN_ID: run_id}
    # Not retried: creating a version is not idempotent. The tags travel with the creation, so a
    # re-run after a lost reply finds this version by its fingerprint instead of creating another.
    mv = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
    if mv.status != "READY":
        raise RuntimeError(f"model {model_name} version {mv.version} is {mv.status}, not READY; "
                           "alias 'challenger' left unchanged")
    first = _first_with_fingerprint(client, model_name, fingerprint)
    if first is not None and int(first.version) < int(mv.version):
        # Another registrar (a run on another machine sharing this MLflow server) made a version of
        # the same model between our search and our creation: the lowest version wins, ours goes.
        log.warning("model %s version %s holds fingerprint %s too (registered concurrently); deleting "
                    "version %s and keeping %s", model_name, first.version, fingerprint[:12], mv.version, first.version)
        call_with_retry(client.delete_model_version, model_name, mv.version)
        call_with_retry(client.set_registered_model_alias, model_name, CHALLENGER, first.version)
        return RegisteredVersion(model_name, str(first.version), first.run_id or "", True,
                                 f"models:/{model_name}/{first.version}")
    call_with_retry(client.set_registered_model_alias, model_name, CHALLENGER, mv.version)
    log.info("registered %s version %s (%s export, alias %s)", model_name, mv.version, kind, CHALLENGER)
    return RegisteredVersion(model_name, str(mv.version), run_id, False, f"models:/{model_name}/{mv.version}")


@contextlib.contextmanager
def _pipeline_classes_resolved():
    """MLflow 3.17's folder form of `log_model` reads `pipelines.check_task(task)[1]["impl"].__name__`,
    but transformers 5 names the pipeline class by a dotted string
    ('transformers.pipelines.text_generation.TextGenerationPipeline'). For the duration of the call,
    `check_task` answers with the class itself; everything else about it is unchanged."""
    import importlib

    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task):
        name, meta, options = original(task)
        impl = meta.get("impl")
        if isinstance(impl, str):
            module, _, cls = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _log_adapter_artifact(adapter_dir: Path, tokenizer, base: BaseModelRef | None, run_id: str) -> str:
    """Log a merged export's adapter (+ tokenizer) as run artifacts, its config naming the portable base."""
    with tempfile.TemporaryDirectory(prefix="ftflow-adapter-") as tmp:
        out = Path(tmp) / ADAPTER_ARTIFACT
        shutil.copytree(adapter_dir, out)
        tokenizer.save_pretrained(out)
        if base is not None:
            cfg_path = out / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(base_model_name_or_path=base.name, revision=base.revision)
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        call_with_retry(_client().log_artifacts, run_id, str(out), ADAPTER_ARTIFACT)
    return f"runs:/{run_id}/{ADAPTER_ARTIFACT}"


def record_eval(model_name: str, version: str, run_id: str, metrics: dict[str, float]) -> None:
    """Mark `version` as scored by the inference run `run_id` (what `promote_cli` requires)."""
    client = _client()
    for k, v in metrics.items():
        call_with_retry(client.set_model_version_tag, model_name, version, TAG_EVAL_METRIC + k, f"{float(v):.6g}")
    call_with_retry(client.set_model_version_tag, model_name, version, TAG_EVAL_RUN, run_id)


def version_eval_metrics(model_name: str, version: str) -> dict[str, float]:
    """The metrics `record_eval` stored on a version ({} when it was never scored)."""
    mv = call_with_retry(_client().get_model_version, model_name, version)
    return {k[len(TAG_EVAL_METRIC):]: float(v) for k, v in mv.tags.items() if k.startswith(TAG_EVAL_METRIC)}


# --------------------------------------------------------------------------- promotion


def decide_promotion(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    *,
    metric: str,
    min_improvement: float,
    no_regress: list[str],
) -> dict[str, Any]:
    """Promote iff challenger[metric] - champion[metric] > min_improvement and no `no_regress` metric drops.

    `champion` is the current champion's scores, or the base model's when there is no champion yet;
    None (nothing to compare with) promotes.
    """
    for key in [metric, *no_regress]:
        if key not in challenger:
            raise KeyError(f"challenger metrics lack {key!r} (have {sorted(challenger)}); "
                           "set promote.metric / promote.no_regress to metrics the eval stage computes")
    c = float(challenger[metric])
    if champion is None:
        return {"promote": True, "reason": "no champion and no baseline to compare with",
                "metric": metric, "challenger_score": c, "champion_score": None, "delta": None}
    for key in [metric, *no_regress]:
        if key not in champion:
            raise KeyError(f"champion metrics lack {key!r} (have {sorted(champion)})")
    b = float(champion[metric])
    delta = c - b
    regressed = [k for k in no_regress if float(challenger[k]) < float(champion[k])]
    if regressed:
        promote = False
        reason = "regressed on " + ", ".join(
            f"{k} ({float(challenger[k]):.4f} < {float(champion[k]):.4f})" for k in regressed)
    elif delta > min_improvement:
        promote = True
        reason = f"{metric} improved by {delta:+.4f} (> {min_improvement:g})"
    else:
        promote = False
        reason = f"{metric} changed by {delta:+.4f}, not more than the required {min_improvement:g}"
    return {"promote": promote, "reason": reason, "metric": metric,
            "challenger_score": c, "champion_score": b, "delta": delta}


def current_champion(model_name: str) -> str | None:
    """The version alias `champion` points at, or None (no champion yet, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(call_with_retry(_client().get_model_version_by_alias, model_name, CHAMPION).version)
    except MlflowException as err:
        status = err.get_http_status_code()
        # 404: no such model; 400 "alias champion not found": no champion yet
        if status == 404 or (status == 400 and "not found" in err.message.lower()):
            return None
        raise


def apply_promotion(model_name: str, version: str, decision: dict[str, Any], *, who: str = "ftflow",
                    why: str = "") -> None:
    """Write `decision` as `ftflow.promotion.*` tags on `version`; if it promotes, move `champion` there.

    The version it replaces is kept in `ftflow.promotion.previous_champion`, which `rollback_champion` follows.
    """
    client = _client()
    version = str(version)
    previous = current_champion(model_name)
    if previous == version:  # nothing to decide: the record of when it became champion stays as it was
        log.info("%s: version %s is already the champion; nothing moved", model_name, version)
        return
    # Tags are what people filter by (promoted or not, who, why); the scores and the comparison are
    # in the version's description (`version_scorecard`).
    tags = {
        "promote": str(bool(decision["promote"])).lower(),
        "reason": str(decision.get("reason", "")),
        "who": who,
        "why": why,
    }
    moving = bool(decision["promote"])
    if moving:
        tags["previous_champion"] = previous or ""
    for k, v in tags.items():
        call_with_retry(client.set_model_version_tag, model_name, version, TAG_PROMO + k, v)
    if moving:
        call_with_retry(client.set_registered_model_alias, model_name, CHAMPION, version)
        log.info("%s: champion %s -> %s (%s)", model_name, previous or "none", version, tags["reason"])
    else:
        log.info("%s: version %s not promoted (%s)", model_name, version, tags["reason"])


def _fmt(x: Any) -> str:
    return "" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))


class PromotionRefused(Exception):
    """A manual promotion or rollback that the registry's state does not allow; the message says what to do."""


def resolve_version(model_ref: str) -> tuple[str, str] | None:
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`; None for folders and hub ids."""
    if not model_ref.startswith("models:/"):
        return None
    rest = model_ref[len("models:/"):]
    client = _client()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(call_with_retry(client.get_model_version_by_alias, name, alias).version)
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, str(call_with_retry(client.get_model_version, name, version).version)
    raise ValueError(f"model {model_ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def lookup_version(name: str, version: str | None = None, alias: str | None = None):
    """The ModelVersion `name`/`version` (or `name`@`alias`, or None when neither is given: the model
    only must exist); LookupError naming what exists instead.

    For the words a person reads before anything is changed: `VERSION` must be a number, the model
    must be registered, the version or alias must exist (the message lists the ones that do).
    """
    from mlflow.exceptions import MlflowException

    if version is not None and not (str(version).isdigit() and int(version) > 0):
        raise LookupError(f"version must be a version number such as 1, got {str(version)[:40]!r}")
    client = _client()
    where = os.environ.get("MLFLOW_TRACKING_URI", "the MLflow registry")
    try:
        model = call_with_retry(client.get_registered_model, name)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = [m.name for m in call_with_retry(client.search_registered_models, max_results=10)]
        known = f"registered models: {', '.join(names)}" if names else "the registry is empty"
        raise LookupError(f"no registered model {name!r} in {where} ({known}). A finished `ftflow run` "
                          "registers one (configs/demo.yaml registers ftflow-demo).") from None
    versions = sorted((int(v.version) for v in call_with_retry(client.search_model_versions, f"name='{name}'")))
    have = f"versions: {', '.join(map(str, versions[-10:]))}" if versions else "no versions"
    if alias is None and version is None:
        return None
    if alias is not None:
        if alias not in (model.aliases or {}):
            aliases = ", ".join(f"@{a}" for a in sorted(model.aliases or {})) or "none"
            raise LookupError(f"model {name!r} has no alias @{alias} (aliases: {aliases}; {have})")
        return call_with_retry(client.get_model_version_by_alias, name, alias)
    if int(version) not in versions:
        raise LookupError(f"model {name!r} has no version {version} ({have})")
    return call_with_retry(client.get_model_version, name, str(int(version)))


def promotable_version(name: str, version: str, *, force: bool):
    """The ModelVersion `promote_version` would promote; LookupError / PromotionRefused otherwise."""
    mv = lookup_version(name, str(version))
    if not mv.tags.get(TAG_EVAL_RUN) and not force:
        raise PromotionRefused(
            f"{name} version {mv.version} has no scored inference run (tag {TAG_EVAL_RUN}). Score it first "
            f"(`ftflow eval --model models:/{name}/{mv.version} --data FILE`, or the finetune flow), "
            "or pass --force to promote it unscored.")
    return mv


def promote_version(name: str, version: str, *, force: bool, why: str, who: str) -> dict[str, Any]:
    """Make `version` of `name` the champion, by a person's decision.

    Refused (PromotionRefused) when the version has no scored inference run (tag `ftflow.eval.run_id`,
    written by the finetune flow or the `evaluate` flow) unless `force`. Who, why and the scores the
    version earned are written as `ftflow.promotion.*` tags. Returns what happened.
    """
    client = _client()
    mv = promotable_version(name, version, force=force)
    version = str(mv.version)
    scored_by = mv.tags.get(TAG_EVAL_RUN)
    previous = current_champion(name)
    scores = version_eval_metrics(name, version)
    previous_scores = version_eval_metrics(name, previous) if previous else {}
    reason = "manual promotion" + (f" (scored by run {scored_by})" if scored_by else " (forced, unscored)")
    decision = {"promote": True, "reason": reason, "metric": "", "challenger_score": None,
                "champion_score": None, "delta": None}
    apply_promotion(name, version, decision, who=who, why=why)
    if force and not scored_by:
        call_with_retry(client.set_model_version_tag, name, version, TAG_PROMO + "forced", "true")
    return {"model": name, "version": version, "previous_champion": previous, "scored_by": scored_by,
            "forced": bool(force and not scored_by), "scores": scores, "previous_scores": previous_scores,
            "reason": reason, "who": who, "why": why}


def rollback_target(name: str) -> tuple[str, str]:
    """(current champion, the version it replaced) of `name`; LookupError / PromotionRefused otherwise."""
    from mlflow.exceptions import MlflowException

    client = _client()
    current = current_champion(name)
    if current is None:
        lookup_version(name)  # LookupError when there is no such model at all
        raise PromotionRefused(f"model {name!r} has no champion to roll back; promote a version first "
                               f"(`ftflow promote {name} VERSION --why TEXT`)")
    mv = call_with_retry(client.get_model_version, name, current)
    previous = mv.tags.get(TAG_PREVIOUS, "")
    if not previous:
        raise PromotionRefused(f"{name} version {current} has no previous champion recorded (tag {TAG_PREVIOUS}); "
                               "promote a version explicitly with `ftflow promote`")
    try:
        call_with_retry(client.get_model_version, name, previous)
    except MlflowException:
        raise PromotionRefused(f"previous champion {name} version {previous} no longer exists; "
                               "promote a version explicitly with `ftflow promote`") from None
    return current, previous


def rollback_champion(name: str, *, why: str, who: str) -> dict[str, Any]:
    """Move `champion` back to the version the current one replaced (its `previous_champion` tag).

    Both versions get `ftflow.rollback.*` tags (who, why, when, from/to). Refused when there is no
    champion, no recorded predecessor, or the predecessor was deleted.
    """
    client = _client()
    current, previous = rollback_target(name)
    record = {"to": previous, "who": who, "why": why, "at": _now()}
    for k, v in record.items():
        call_with_retry(client.set_model_version_tag, name, current, TAG_ROLLBACK + k, v)
    for k, v in {"restored_from": current, "restored_by": who, "restored_why": why}.items():
        call_with_retry(client.set_model_version_tag, name, previous, TAG_ROLLBACK + k, v)
    call_with_retry(client.set_registered_model_alias, name, CHAMPION, previous)
    log.info("%s: champion %s -> %s (rollback by %s: %s)", name, current, previous, who, why)
    return {"model": name, "from": current, "to": previous, "who": who, "why": why}


def promote_cli(name: str, version: str, force: bool, why: str, who: str | None = None) -> int:
    """`ftflow promote NAME VERSION` without Prefect: 0 done, 1 refused, 2 no such version."""
    try:
        r = promote_version(name, str(version), force=force, why=why, who=who or current_user())
    except LookupError as err:
        sys.stderr.write(f"error: {err}" + "\n")
        return 2
    except PromotionRefused as err:
        sys.stderr.write(f"error: {err}" + "\n")
        return 1
    sys.stdout.write(f"{name}: champion {r['previous_champion'] or 'none'} -> {r['version']}" + "\n")
    return 0


def rollback_cli(name: str, why: str, who: str | None = None) -> int:
    """`ftflow rollback NAME` without Prefect: 0 done, 1 refused."""
    try:
        r = rollback_champion(name, why=why, who=who or current_user())
    except PromotionRefused as err:
        sys.stderr.write(f"error: {err}" + "\n")
        return 1
    sys.stdout.write(f"{name}: champion {r['from']} -> {r['to']} (rollback)" + "\n")
    return 0


def current_user() -> str:
    """Who is acting: the login name, recorded in promotion and rollback tags."""
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def promotion_markdown(decision: dict[str, Any], challenger_metrics: dict[str, float],
                       champion_metrics: dict[str, float] | None, model_name: str, version: str,
                       compared_with: str = "champion") -> str:
    """A markdown report of a promotion decision (for a Prefect artifact).

    `compared_with` names what the challenger was scored against ("champion v3", "base model").
    """
    champion_metrics = champion_metrics or {}
    if decision.get("already_champion"):
        verdict = "already **champion** (nothing moved)"
    else:
        verdict = "promoted to **champion**" if decision["promote"] else "**not promoted**"
    lines = [
        f"## {model_name} version {version}: {verdict}",
        "",
        f"{decision.get('reason', '')}",
        "",
        f"Decision metric: `{decision.get('metric', '')}`; compared with: {compared_with}",
        "",
        *_scores_table(challenger_metrics, champion_metrics, "challenger", compared_with, decision.get("metric")),
    ]
    return "\n".join(lines) + "\n"


def version_scorecard(model_name: str, version: str, decision: dict[str, Any], challenger_metrics: dict[str, float],
                      champion_metrics: dict[str, float] | None, *, compared_with: str, base_model: str,
                      data: dict[str, Any] | None = None, at: str | None = None) -> str:
    """The registry description of a version: its scorecard as Markdown (metrics against the model it was
    compared with, the decision, the data and the base model). Shown on the version's page in the MLflow UI."""
    if decision.get("already_champion"):
        verdict = "already **@champion**, nothing moved"
    else:
        verdict = "promoted to **@champion**" if decision["promote"] else "**not promoted**"
    data = data or {}
    rows = [("decision", f"{verdict}: {decision.get('reason', '')}"),
            ("decision metric", f"`{decision.get('metric', '')}`"),
            ("compared with", compared_with),
            ("base model", f"`{base_model}`")]
    rows += [(k, f"`{v}`" if isinstance(v, str) else str(v)) for k, v in data.items()]
    rows.append(("scored at", at or _now()))
    no_n = {k: v for k, v in challenger_metrics.items() if k != "n"}
    old = {k: v for k, v in (champion_metrics or {}).items() if k != "n"}
    lines = [f"### {model_name} version {version}: {verdict}", "",
             *_scores_table(no_n, old, f"version {version}", compared_with, decision.get("metric")), "",
             "| | |", "|---|---|", *(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


def describe_version(model_name: str, version: str, markdown: str) -> None:
    """Set a version's description (its scorecard) in the registry."""
    call_with_retry(_client().update_model_version, model_name, str(version), description=markdown)


def _scores_table(new: dict[str, float], old: dict[str, float], new_label: str, old_label: str,
                  mark: str | None = None) -> list[str]:
    lines = [f"| metric | {new_label} | {old_label} | delta |", "|---|---:|---:|---:|"]
    for k in list(new) + [k for k in old if k not in new]:
        c, b = new.get(k), old.get(k)
        d = c - b if isinstance(c, (int, float)) and isinstance(b, (int, float)) else None
        lines.append(f"| {k}{' ⬅' if k == mark else ''} | {_cell(c)} | {_cell(b)} | {_cell(d, signed=True)} |")
    return lines


def manual_promotion_markdown(r: dict[str, Any]) -> str:
    """A markdown report of `promote_version`'s result: who, why, and both versions' recorded scores."""
    previous = r["previous_champion"]
    lines = [
        f"## {r['model']}: champion {previous or 'none'} → {r['version']}",
        "",
        r["reason"],
        "",
        "| | |",
        "|---|---|",
        f"| who | {r['who']} |",
        f"| why | {r['why']} |",
        f"| scored by | {r['scored_by'] or '**unscored (forced)**'} |",
        "",
        *_scores_table({k: v for k, v in r["scores"].items() if k != "n"},
                       {k: v for k, v in r["previous_scores"].items() if k != "n"},
                       f"version {r['version']}", f"previous champion {previous}" if previous else "no previous champion"),
    ]
    return "\n".join(lines) + "\n"


def rollback_markdown(r: dict[str, Any]) -> str:
    """A markdown report of `rollback_champion`'s result."""
    return (f"## {r['model']}: champion {r['from']} → {r['to']} (rollback)\n\n"
            f"| | |\n|---|---|\n| previous champion | {r['from']} |\n| new champion | {r['to']} |\n"
            f"| who | {r['who']} |\n| why | {r['why']} |\n")


def _cell(x: Any, signed: bool = False) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, float)):
        return f"{x:+.4f}" if signed else f"{x:.4f}"
    return str(x)
