"""The Prefect task layer: each stage's plain logic wrapped with logging and artifacts.

Nothing here holds pipeline logic of its own; it calls the stage modules with plain values,
forwards their logs to the Prefect run log, writes the artifacts a person reads in the UI, and
leaves retries to the one MLflow retry layer (`tasks.registry.call_with_retry`), never the training launch.

Orchestration extras, all here:
- convert and tokenize are Prefect-cached on *content* (input bytes, settings, stage code), so a
  re-run shows them as Cached in the UI; what they would have logged to MLflow is logged by the
  `record-*` tasks, which always run;
- `gpu_slot()` holds one slot of the `gpu` global concurrency limit around training: a second
  run waits for the slot (it does not fail). Without a Prefect server the slots are file locks.
- two runs of the same config at once: tokenizing and registering are done under file locks
  (`<FTFLOW_HOME>/locks/`), so the second run waits, then finds the cache / the version made.
  Every lock here is an flock, released by the OS when its holder dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ftflow.config import PipelineConfig
from ftflow.utils import sha256_json, state_dir

GPU_LIMIT = "gpu"  # the global concurrency limit `make up` creates; FTFLOW_GPU_SLOTS sizes it

# Retries: MLflow calls are retried inside the stage logic by `tasks.registry.call_with_retry`, the
# one retry layer (bounded by FTFLOW_MLFLOW_RETRY_SECONDS). No task here has Prefect retries, so
# attempts never multiply; a training launch is never retried (the next run resumes instead).


@dataclass
class BaseModel_:
    path: str
    fingerprint: str
    pad_token_id: int
    eos_token_id: int


@dataclass
class DataOut:
    train_path: str
    eval_path: str
    rejects_path: str
    report: dict[str, Any]


@dataclass
class TokensOut:
    key: str
    path: str
    hit: bool
    stats: dict[str, Any]
    template_text: str
    reference_inputs: list[list[int]] = field(default_factory=list)


def open_experiment(cfg: PipelineConfig) -> str:
    """The MLflow experiment id of `registry.experiment`, created if new.

    Under a lock: two runs starting together on a new FTFLOW_HOME would both create the MLflow
    SQLite tables, and one of them would fail half-way through the migrations."""
    from infra.local import ensure_experiment
    from tasks.train import exclusive

    with exclusive(state_dir() / "locks" / "mlflow-store.lock", "another run is opening the MLflow store"):
        return ensure_experiment(cfg.registry.experiment)


@task(name="prepare-base-model")
def prepare_base_model(cfg: PipelineConfig) -> BaseModel_:
    from transformers import AutoTokenizer

    from tasks.base_model import model_fingerprint, resolve_model_path

    logger = get_run_logger()
    path = resolve_model_path(cfg.model.name_or_path)
    tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        logger.warning(
            "tokenizer of %s has pad == eos (or no pad); padding is excluded by the attention mask and labels, "
            "and eos stays in the labels", cfg.model.name_or_path,
        )
    fp = model_fingerprint(path, cfg.model.revision, cfg.model.trust_remote_code)
    logger.info("base model %s -> %s (fingerprint %s)", cfg.model.name_or_path, path, fp[:12])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return BaseModel_(path=path, fingerprint=fp, pad_token_id=pad, eos_token_id=tok.eos_token_id)


# Content keys: each artifact has one, computed by its stage module; the Prefect cache uses it as is.
#   converted data  tasks.convert.convert_key     input bytes, data settings, convert.py
#   tokenized set   tasks.tokenize.tokenize_key   JSONL bytes, tokenizer files (hub id: resolved commit), settings, code
#   training        tasks.train.train_key         tokenize key, model fingerprint, train settings, rank code
#   export          tasks.consolidate             a folder inside the training's, named by export.dtype


def _convert_cache_key(context, params: dict[str, Any]) -> str | None:
    """None (no caching) for hub datasets, which can change."""
    from tasks.convert import convert_key

    key = convert_key(params["cfg"])
    return None if key is None else "convert-" + key


def _tokenize_cache_key(context, params: dict[str, Any]) -> str:
    """The tokenized set's own folder key: a Prefect hit is a folder hit, never a stale one."""
    from tasks.tokenize import tokenize_key

    return "tokenize-" + tokenize_key(params["cfg"], params["train_jsonl"], params["base"].path)


def _outputs_exist(result: Any) -> bool:
    paths = [getattr(result, k) for k in ("train_path", "eval_path", "path") if hasattr(result, k)]
    return all(Path(p).exists() for p in paths)


def run_cached(stage, *args: Any) -> tuple[Any, bool]:
    """Call a content-cached stage: (result, True) when Prefect served it from its cache.

    A cached result whose files were deleted since (e.g. `make clean-state` of a run folder) is
    recomputed, never returned."""
    state = stage(*args, return_state=True)
    result = state.result()
    if state.name == "Cached" and not _outputs_exist(result):
        state = stage.with_options(refresh_cache=True)(*args, return_state=True)
        result = state.result()
    return result, state.name == "Cached"


@task(name="convert-data", cache_key_fn=_convert_cache_key, persist_result=True)
def convert_data(cfg: PipelineConfig, out_dir: Path) -> DataOut:
    from flows import monitor
    from tasks.convert import DataError, convert_from_config

    try:
        res = convert_from_config(cfg, out_dir)
    except DataError as err:
        report = getattr(err, "report", None) or {}
        if report.get("reject_fraction", 0) > cfg.data.max_reject_fraction:
            monitor.data_rejected_over_limit(cfg.registry.model_name, report, cfg.data.max_reject_fraction, str(err))
        raise
    return DataOut(str(res.train_path), str(res.eval_path), str(res.rejects_path), res.report)


@task(name="record-data", retries=0)
def record_data(cfg: PipelineConfig, data: DataOut, cached: bool, parent_run_id: str) -> None:
    """The data report in MLflow (parent run) and as a Prefect artifact, cached or not."""
    from tasks.lineage import log_dict, set_tags

    logger = get_run_logger()
    r = data.report
    logger.info(
        "data%s: %d rows in -> %d train + %d eval, %d rejected, %d duplicates (rejects: %s)",
        " (Prefect cache: same inputs as an earlier run)" if cached else "",
        r["rows_in"], r["train_rows"], r["eval_rows"], r["rejected"], r["duplicates"], data.rejects_path,
    )
    log_dict(parent_run_id, r, "data/report.json")
    set_tags(parent_run_id, {"ftflow.data_sha256": r["sha256"]["train"], "ftflow.eval_data_sha256": r["sha256"]["eval"],
                             "ftflow.data_dir": str(Path(data.train_path).parent)})
    rows = [{"count": k, "value": v} for k, v in r.items() if isinstance(v, (int, float))]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in r.get("by_reason", {}).items()]
    create_table_artifact(key="data-report", table=rows, description=f"Data conversion report ({cfg.name})")


@task(name="tokenize", cache_key_fn=_tokenize_cache_key, persist_result=True)
def tokenize(cfg: PipelineConfig, train_jsonl: str, base: BaseModel_) -> TokensOut:
    from tasks.tokenize import tokenize_from_config
    from tasks.train import exclusive

    # Two runs of the same data at once: the second waits here, then hits the first one's cache.
    key = _tokenize_cache_key(None, {"cfg": cfg, "train_jsonl": train_jsonl, "base": base})
    with exclusive(state_dir() / "locks" / f"{key}.lock", "another run is tokenizing the same data"):
        res = tokenize_from_config(cfg, train_jsonl, base.path)
    from datasets import load_from_disk

    ds = load_from_disk(str(res.path))
    reference = [list(ds[i]["input_ids"][:64]) for i in range(min(2, len(ds)))]
    return TokensOut(res.key, str(res.path), res.hit, res.stats, res.template_text, reference)


@task(name="record-tokens", retries=0)
def record_tokens(tokens: TokensOut, cached: bool, parent_run_id: str) -> TokensOut:
    """Token statistics in MLflow and as a Prefect artifact. A Prefect cache hit counts as a cache hit."""
    from tasks.lineage import length_histogram_png, log_dict, log_png, set_tags

    logger = get_run_logger()
    tokens = replace(tokens, hit=tokens.hit or cached)
    s = tokens.stats
    logger.info(
        "tokenize: cache %s (key %s) — %s samples, %s tokens, %s trained",
        "HIT, no work done" if tokens.hit else "miss, built", tokens.key[:16], s.get("samples"), s.get("tokens"), s.get("trained_tokens"),
    )
    log_dict(parent_run_id, s, "data/tokenize_stats.json")
    set_tags(parent_run_id, {"ftflow.tokenized_cache_key": tokens.key, "ftflow.tokenized_cache_hit": tokens.hit})
    hist = s.get("length_histogram")
    if hist:
        log_png(parent_run_id, length_histogram_png(hist), "data/length_histogram.png", state_dir() / "tmp" / parent_run_id)
        bins = [f"{a}-{b}" for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
        create_table_artifact(
            key="tokenize-stats",
            table=[{"tokens": b, "samples": c} for b, c in zip(bins, hist["counts"])]
            + [{"tokens": k, "samples": s.get(k)} for k in ("samples", "tokens", "trained_tokens", "truncated", "dropped", "rejected_total")],
            description=f"Tokenization ({'cache hit' if tokens.hit else 'built'}, key {tokens.key[:16]}): length histogram and counts",
        )
    return tokens


@contextmanager
def gpu_slot(cfg: PipelineConfig) -> Iterator[None]:
    """Hold one slot of the `gpu` global concurrency limit; wait (never fail) while others hold them all.

    The limit is created with FTFLOW_GPU_SLOTS slots (default 1) if the server has none yet, so
    the wait also holds for runs on an ephemeral server or a stack started before this code."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    logger = get_run_logger()
    if not PREFECT_API_URL.value():
        with _local_gpu_slot(cfg, logger):
            yield
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=int(os.environ.get("FTFLOW_GPU_SLOTS", 1)))
                )
            except ObjectAlreadyExists:  # another run created it first
                pass
    logger.info("waiting for a '%s' concurrency slot (training of %s)", GPU_LIMIT, cfg.name)
    # A lost lease (server briefly unreachable) must not stop an hours-long training: only warn.
    with concurrency(GPU_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        logger.info("'%s' slot acquired", GPU_LIMIT)
        yield


@contextmanager
def _local_gpu_slot(cfg: PipelineConfig, logger) -> Iterator[None]:
    """The `gpu` slots as file locks under <FTFLOW_HOME>/locks/, for runs without a Prefect server.

    Prefect's ephemeral mode gives every process its own temporary server, which keeps slot leases
    in memory and never expires them: a run killed while training would hold its slot for ever and
    every later run would wait on it. An flock is released by the OS when its holder dies."""
    slots = max(1, int(os.environ.get("FTFLOW_GPU_SLOTS", 1)))
    root = state_dir() / "locks"
    root.mkdir(parents=True, exist_ok=True)
    logger.info("waiting for a '%s' slot (training of %s; %d local slot(s) in %s)", GPU_LIMIT, cfg.name, slots, root)
    while True:
        for i in range(slots):
            with open(root / f"{GPU_LIMIT}-{i}.lock", "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    logger.info("'%s' slot acquired", GPU_LIMIT)
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                return
        time.sleep(1.0)


def _rank0_line(line: str) -> str:
    """torchrun prefixes rank output with '[default0]:'; a progress bar without a newline can sit in front."""
    return line.rsplit("[default0]:", 1)[-1].strip()


# An exception line of rank 0 ("ValueError: ..."), not a source line that mentions one, and not
# torchrun's own ChildFailedError (the command's error message names the failed rank instead).
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b:")


def _shown_rank0_line(line: str) -> bool:
    """Rank 0's lines the run log shows: ftflow's own training log lines and the exception it raises."""
    if "ftflow.train" in line:
        return True
    text = _rank0_line(line)
    return bool(_EXCEPTION_LINE.match(text)) and "ChildFailedError" not in text


@task(name="train", retries=0)
def train(cfg: PipelineConfig, tokens: TokensOut, base: BaseModel_, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """Launch the ranks. Never retried: a failure resumes from the last checkpoint on the next run."""
    from tasks.lineage import end_run, log_dict, log_loss_plot, set_tags, start_child_run
    from tasks.train import load_deepspeed_config, run_training, train_key, training_root

    logger = get_run_logger()
    key = train_key(cfg.train, tokens.key, base.fingerprint, tokens.template_text)
    train_dir = training_root(cfg.train) / f"{cfg.name}-{key}"
    child = start_child_run(experiment_id, parent_run_id, "train", tags={"ftflow.train_key": key})
    import os

    from flows import monitor

    # Rank 0's lines arrive on the launcher's reader thread, outside the task's run context: the
    # adapter carries the run ids, so Prefect's API handler files them under this task run (without
    # them it warns "attempted to send logs to the API without a flow run id" for every line).
    rank0 = logging.LoggerAdapter(logging.getLogger("ftflow.rank0"), dict(getattr(logger, "extra", None) or {}))
    progress = monitor.TrainingProgress(f"Training {cfg.name} ({cfg.train.mode})")

    def on_line(line: str) -> None:
        if monitor.PROGRESS_MARK in line:
            progress.feed(line)
        elif _shown_rank0_line(line):
            rank0.info(_rank0_line(line))

    stop_system_metrics = monitor.start_system_metrics(child, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        summary = run_training(
            train=cfg.train,
            train_dir=train_dir,
            model_path=base.path,
            dataset_path=tokens.path,
            pad_token_id=base.pad_token_id,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            mlflow_run_id=child,
            reference_inputs=tokens.reference_inputs,
            on_line=on_line,
        )
    except Exception as err:
        monitor.training_failed(cfg.registry.model_name, err, train_dir=str(train_dir), mlflow_run_id=child)
        end_run(child, "FAILED")
        raise
    finally:
        stop_system_metrics()
        progress.close()
    if summary.get("reused"):
        progress.reused(summary.get("global_step") or 0)
        progress.close()
    if summary.get("resumed_from"):
        logger.info("resumed from %s", summary["resumed_from"])
    if summary.get("reused"):
        logger.info("identical training already complete in %s: reused", train_dir)
    log_loss_plot(child, summary.get("log_history", []), Path(summary["final_dir"]))
    ds = load_deepspeed_config(cfg.train.deepspeed)
    if ds:
        log_dict(child, ds, "training/deepspeed_config.json")
    set_tags(child, {"ftflow.train_dir": str(train_dir), "ftflow.reused": summary.get("reused")})
    end_run(child)
    runtime = summary.get("train_runtime_s") or 0.0
    create_markdown_artifact(
        key="training-summary",
        markdown=(
            f"## Training ({cfg.train.mode}, {summary.get('world_size')} rank(s), ZeRO-{summary.get('deepspeed_stage')})\n\n"
            f"| | |\n|---|---|\n| steps | {summary.get('global_step')} |\n| final train loss | {summary.get('train_loss'):.4f} |\n"
            f"| runtime | {runtime:.1f} s |\n| trainable parameters | {summary.get('trainable_parameters'):,} |\n"
            f"| MLflow run | `{child}` |\n| folder | `{train_dir}` |\n"
        ),
        description="Training summary",
    )
    return {**{k: v for k, v in summary.items() if k != "log_history"}, "train_key": key, "train_dir": str(train_dir), "run_id": child}


@task(name="consolidate")
def consolidate(cfg: PipelineConfig, trained: dict[str, Any], base: BaseModel_, tokens: TokensOut) -> str:
    from tasks.consolidate import consolidate as export, verify_export

    logger = get_run_logger()
    # export.dtype is not part of the training's key: a different one gets its own folder
    out = Path(trained["train_dir"]) / ("export" if cfg.export.dtype == "auto" else f"export-{cfg.export.dtype}")
    export(
        trained["final_dir"], base.path, out, mode=cfg.train.mode, chat_template=tokens.template_text,
        merge=cfg.train.lora.merge, trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.export.dtype,
    )
    diff = verify_export(out, trained["final_dir"], tokens.reference_inputs)
    if diff is not None:
        logger.info("export %s: logits match the in-training reference (max |diff| %.2e)", out, diff)
    return str(out)


@task(name="register", retries=0)
def register(cfg: PipelineConfig, model_dir: str, fingerprint: str, parent_run_id: str, tags: dict[str, str]):
    from tasks.registry import register_model
    from tasks.train import exclusive

    logger = get_run_logger()
    # register_model looks for the fingerprint, then creates a version: two runs of the same training
    # doing that at once would both find none and make two versions. One at a time, the second finds
    # the first one's version.
    lock = state_dir() / "locks" / f"register-{sha256_json(cfg.registry.model_name)[:16]}.lock"
    with exclusive(lock, f"another run is registering {cfg.registry.model_name}"):
        rv = register_model(model_dir, model_name=cfg.registry.model_name, run_id=parent_run_id, fingerprint=fingerprint,
                            tags=tags, base_model=cfg.model.name_or_path, base_model_revision=cfg.model.revision)
    logger.info(
        "%s %s version %s (alias challenger)",
        "already registered:" if rv.existed else "registered", rv.name, rv.version,
    )
    from flows import monitor

    monitor.model_registered(rv.name, rv.version, model_uri=rv.model_uri, existed=rv.existed, run_id=parent_run_id,
                             train_key=tags.get("ftflow.train_key"))
    return rv


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextmanager
def _stdout_to_log(logger) -> Iterator[None]:
    """What a library prints to stdout inside the block goes to `logger`, one line, colour codes removed
    (MLflow's GenAI evaluation prints its notice with ANSI colours, which ended up in log files)."""
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            yield
    finally:
        text = " ".join(ln.strip() for ln in _ANSI.sub("", buf.getvalue()).splitlines() if ln.strip())
        if text:
            logger.info("%s", text)


@task(name="evaluate", retries=0)
def evaluate(cfg: PipelineConfig, model_ref: str, eval_jsonl: str, label: str, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    from tasks.evaluate import evaluate_model, log_eval_to_mlflow, log_genai_evaluation
    from tasks.lineage import end_run, start_child_run

    logger = get_run_logger()
    child = start_child_run(experiment_id, parent_run_id, f"eval-{label}", tags={"ftflow.model_ref": model_ref})
    from flows import monitor

    progress = monitor.StageProgress(f"evaluation-progress-{label}", f"Scored inference of the {label} ({model_ref})")
    res = evaluate_model(
        model_ref, eval_jsonl, gen=cfg.eval.generation.model_dump(), batch_size=cfg.eval.batch_size,
        max_samples=cfg.eval.max_samples, trust_remote_code=cfg.model.trust_remote_code, on_progress=progress.update,
    )
    progress.close()
    log_eval_to_mlflow(res, child, label)
    if cfg.eval.mlflow_genai:
        with _stdout_to_log(logger):  # MLflow prints a colour-coded notice to stdout: into the log, as plain text
            log_genai_evaluation(res, child)  # per-example traces with assessments, in the child run
    log_eval_to_mlflow(res, parent_run_id, label)
    end_run(child)
    shown = {k: round(v, 4) for k, v in res.metrics.items() if isinstance(v, float)}
    logger.info("%s (%s): %s", label, model_ref, shown)
    return {"metrics": res.metrics, "run_id": child, "model_ref": model_ref}


@task(name="promote", retries=0)
def promote(cfg: PipelineConfig, version, challenger: dict[str, Any], champion: dict[str, Any], champion_label: str,
            already_champion: bool = False, data_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decide and apply; the decision's words are the same in the log, the artifact, the registry and the summary.

    `already_champion`: the version is @champion already (an unchanged config run again); it was scored
    against `champion_label` for reference only, and nothing moves."""
    from tasks.registry import (apply_promotion, decide_promotion, describe_version, promotion_markdown, record_eval,
                                version_scorecard)

    logger = get_run_logger()
    p = cfg.promote
    record_eval(version.name, version.version, challenger["run_id"], challenger["metrics"])
    decision = decide_promotion(
        challenger["metrics"], champion["metrics"], metric=p.metric, min_improvement=p.min_improvement, no_regress=p.no_regress
    )
    decision["compared_with"] = champion_label
    if already_champion:
        decision.update(
            promote=False, already_champion=True,
            reason=f"version {version.version} is already @champion; nothing moved (compared with the {champion_label} "
                   f"for reference: {decision['reason']})",
        )
    else:
        apply_promotion(version.name, version.version, decision, who="ftflow finetune flow", why=decision["reason"])
        r = data_report or {}
        data = {k: v for k, v in {
            "train data": ", ".join(cfg.data.train), "eval data": ", ".join(cfg.data.eval) or "split from train",
            "train / eval rows": f"{r['train_rows']} / {r['eval_rows']}" if "train_rows" in r else None,
            "train data sha256": (r.get("sha256") or {}).get("train"),
        }.items() if v}
        # the registry page of the version: the scorecard of this decision (an already-champion
        # version keeps the scorecard of the decision that made it champion)
        describe_version(version.name, version.version, version_scorecard(
            version.name, version.version, decision, challenger["metrics"], champion["metrics"],
            compared_with=champion_label, base_model=cfg.model.name_or_path, data=data))
    create_markdown_artifact(
        key="promotion-decision",
        markdown=promotion_markdown(decision, challenger["metrics"], champion["metrics"], version.name, version.version,
                                    compared_with=champion_label),
        description="Promotion decision",
    )
    logger.info("promotion: %s — %s", promotion_verdict(decision), decision["reason"])
    from flows import monitor

    monitor.promotion_decided(version.name, version.version, decision, challenger["metrics"], champion["metrics"])
    return decision


def promotion_verdict(decision: dict[str, Any]) -> str:
    """The one word a person reads for a decision: in the log, the summary and the artifact alike."""
    if decision.get("already_champion"):
        return "ALREADY @champion (nothing moved)"
    return "PROMOTED to @champion" if decision["promote"] else "not promoted"


def json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    return str(o)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=json_default))
