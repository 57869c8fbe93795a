"""The Prefect task layer: each stage's plain logic wrapped with logging, retries and artifacts.

Nothing here holds pipeline logic of its own; it calls the stage modules with plain values,
forwards their logs to the Prefect run log, writes the artifacts a person reads in the UI, and
retries only what is transient (MLflow calls), never the training launch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from ftflow.config import PipelineConfig, resolve_data_path
from ftflow.utils import state_dir

TRANSIENT = (ConnectionError, TimeoutError, OSError)


def _transient(task, task_run, state) -> bool:
    """Retry MLflow/HTTP failures (connection refused, timeouts, 5xx), not programming errors."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception as err:  # mlflow wraps HTTP errors in MlflowException
        text = str(err).lower()
        return any(s in text for s in ("connection", "timed out", "temporarily", "502", "503", "504", "max retries"))
    return False


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
    fp = model_fingerprint(path)
    logger.info("base model %s -> %s (fingerprint %s)", cfg.model.name_or_path, path, fp[:12])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return BaseModel_(path=path, fingerprint=fp, pad_token_id=pad, eos_token_id=tok.eos_token_id)


@task(name="convert-data")
def convert_data(cfg: PipelineConfig, out_dir: Path, parent_run_id: str) -> DataOut:
    from tasks.convert import convert_dataset
    from tasks.lineage import log_dict, set_tags

    logger = get_run_logger()
    d = cfg.data
    res = convert_dataset(
        [resolve_data_path(cfg, p) for p in d.train],
        [resolve_data_path(cfg, p) for p in d.eval],
        out_dir,
        fmt=d.format,
        columns=d.columns,
        system_prompt=d.system_prompt,
        eval_fraction=d.eval_fraction,
        split_seed=d.split_seed,
        on_bad_row=d.on_bad_row,
        max_reject_fraction=d.max_reject_fraction,
        objective=cfg.tokenize.objective,
    )
    r = res.report
    logger.info(
        "data: %d rows in -> %d train + %d eval, %d rejected, %d duplicates (rejects: %s)",
        r["rows_in"], r["train_rows"], r["eval_rows"], r["rejected"], r["duplicates"], res.rejects_path,
    )
    log_dict(parent_run_id, r, "data/report.json")
    set_tags(parent_run_id, {"ftflow.data_sha256": r["sha256"]["train"], "ftflow.eval_data_sha256": r["sha256"]["eval"]})
    rows = [{"count": k, "value": v} for k, v in r.items() if isinstance(v, (int, float))]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in r.get("by_reason", {}).items()]
    create_table_artifact(key="data-report", table=rows, description=f"Data conversion report ({cfg.name})")
    return DataOut(str(res.train_path), str(res.eval_path), str(res.rejects_path), r)


@task(name="tokenize")
def tokenize(cfg: PipelineConfig, train_jsonl: str, base: BaseModel_, parent_run_id: str) -> TokensOut:
    from tasks.lineage import length_histogram_png, log_dict, log_png, set_tags
    from tasks.tokenize import tokenize_dataset

    logger = get_run_logger()
    t = cfg.tokenize
    res = tokenize_dataset(
        train_jsonl,
        base.path,
        cache_root=state_dir() / "cache" / "tokenized",
        template=t.template,
        objective=t.objective,
        train_on=t.train_on,
        max_length=t.max_length,
        length_policy=t.length_policy,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    s = res.stats
    logger.info(
        "tokenize: cache %s (key %s) — %s samples, %s tokens, %s trained",
        "HIT, no work done" if res.hit else "miss, built", res.key[:16], s.get("samples"), s.get("tokens"), s.get("trained_tokens"),
    )
    log_dict(parent_run_id, s, "data/tokenize_stats.json")
    set_tags(parent_run_id, {"ftflow.tokenized_cache_key": res.key, "ftflow.tokenized_cache_hit": res.hit})
    hist = s.get("length_histogram")
    if hist:
        log_png(parent_run_id, length_histogram_png(hist), "data/length_histogram.png", state_dir() / "tmp" / parent_run_id)
        bins = [f"{a}-{b}" for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
        create_table_artifact(
            key="tokenize-stats",
            table=[{"tokens": b, "samples": c} for b, c in zip(bins, hist["counts"])]
            + [{"tokens": k, "samples": s.get(k)} for k in ("samples", "tokens", "trained_tokens", "truncated", "dropped", "rejected_total")],
            description=f"Tokenization ({'cache hit' if res.hit else 'built'}, key {res.key[:16]}): length histogram and counts",
        )
    from datasets import load_from_disk

    ds = load_from_disk(str(res.path))
    reference = [list(ds[i]["input_ids"][:64]) for i in range(min(2, len(ds)))]
    return TokensOut(res.key, str(res.path), res.hit, s, res.template_text, reference)


@task(name="train", retries=0)
def train(cfg: PipelineConfig, tokens: TokensOut, base: BaseModel_, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """Launch the ranks. Never retried: a failure resumes from the last checkpoint on the next run."""
    from tasks.lineage import end_run, log_dict, log_loss_plot, set_tags, start_child_run
    from tasks.train import load_deepspeed_config, run_training, train_key

    logger = get_run_logger()
    key = train_key(cfg.train, tokens.key, base.fingerprint, tokens.template_text)
    train_dir = state_dir() / "train" / f"{cfg.name}-{key}"
    child = start_child_run(experiment_id, parent_run_id, "train", tags={"ftflow.train_key": key})
    import os

    rank0 = logging.getLogger("ftflow.rank0")
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
            on_line=lambda line: rank0.info(line) if "ftflow.train" in line or "Error" in line else None,
        )
    except Exception:
        end_run(child, "FAILED")
        raise
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
    out = Path(trained["train_dir"]) / "export"
    export(
        trained["final_dir"], base.path, out, mode=cfg.train.mode, chat_template=tokens.template_text,
        merge=cfg.train.lora.merge, trust_remote_code=cfg.model.trust_remote_code,
    )
    diff = verify_export(out, trained["final_dir"], tokens.reference_inputs)
    if diff is not None:
        logger.info("export %s: logits match the in-training reference (max |diff| %.2e)", out, diff)
    return str(out)


@task(name="register", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=_transient)
def register(cfg: PipelineConfig, model_dir: str, fingerprint: str, parent_run_id: str, tags: dict[str, str]):
    from tasks.registry import register_model

    logger = get_run_logger()
    rv = register_model(model_dir, model_name=cfg.registry.model_name, run_id=parent_run_id, fingerprint=fingerprint, tags=tags)
    logger.info(
        "%s %s version %s (alias challenger)",
        "already registered:" if rv.existed else "registered", rv.name, rv.version,
    )
    return rv


@task(name="evaluate", retries=0)
def evaluate(cfg: PipelineConfig, model_ref: str, eval_jsonl: str, label: str, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    from tasks.evaluate import evaluate_model, log_eval_to_mlflow
    from tasks.lineage import end_run, start_child_run

    logger = get_run_logger()
    child = start_child_run(experiment_id, parent_run_id, f"eval-{label}", tags={"ftflow.model_ref": model_ref})
    res = evaluate_model(
        model_ref, eval_jsonl, gen=cfg.eval.generation.model_dump(), batch_size=cfg.eval.batch_size,
        max_samples=cfg.eval.max_samples, trust_remote_code=cfg.model.trust_remote_code,
    )
    log_eval_to_mlflow(res, child, label)
    log_eval_to_mlflow(res, parent_run_id, label)
    end_run(child)
    shown = {k: round(v, 4) for k, v in res.metrics.items() if isinstance(v, float)}
    logger.info("%s (%s): %s", label, model_ref, shown)
    return {"metrics": res.metrics, "run_id": child, "model_ref": model_ref}


@task(name="promote", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=_transient)
def promote(cfg: PipelineConfig, version, challenger: dict[str, Any], champion: dict[str, Any], champion_label: str) -> dict[str, Any]:
    from tasks.registry import apply_promotion, decide_promotion, promotion_markdown, record_eval

    logger = get_run_logger()
    p = cfg.promote
    record_eval(version.name, version.version, challenger["run_id"], challenger["metrics"])
    decision = decide_promotion(
        challenger["metrics"], champion["metrics"], metric=p.metric, min_improvement=p.min_improvement, no_regress=p.no_regress
    )
    decision["compared_with"] = champion_label
    apply_promotion(version.name, version.version, decision, who="ftflow finetune flow", why=decision["reason"])
    create_markdown_artifact(
        key="promotion-decision",
        markdown=promotion_markdown(decision, challenger["metrics"], champion["metrics"], version.name, version.version),
        description="Promotion decision",
    )
    logger.info("promotion: %s — %s", "PROMOTED to champion" if decision["promote"] else "not promoted", decision["reason"])
    return decision


def json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    return str(o)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=json_default))
