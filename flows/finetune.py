"""The fine-tuning pipeline as a Prefect flow: a short list of stages and one decision.

    raw data → canonical JSONL → tokens (cached) → DeepSpeed ranks → HF model → MLflow version
    → scored inference (challenger vs champion) → alias promotion

Run it with `ftflow run configs/demo.yaml` (or as a Prefect deployment). Each stage is a task in
`tasks.stages`; the logic lives in the stage modules and runs without Prefect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from ftflow.config import PipelineConfig
from ftflow.utils import sha256_json, state_dir
from tasks import stages
from tasks.lineage import end_run, log_text, redact, start_parent_run
from tasks.registry import current_champion


# The whole run ends after this long (training has its own limit, train.timeout_minutes); on a
# timeout every training rank is stopped. FTFLOW_FLOW_TIMEOUT_HOURS changes it.
FLOW_TIMEOUT_S = float(os.environ.get("FTFLOW_FLOW_TIMEOUT_HOURS", 48)) * 3600


@flow(name="finetune", log_prints=False, timeout_seconds=FLOW_TIMEOUT_S)
def finetune(config: PipelineConfig) -> dict[str, Any]:
    logger = get_run_logger()
    run_id = flow_run.get_id() or "local"
    run_name = flow_run.get_name() or "local"
    out_dir = run_output_dir(config.name, run_id)
    experiment_id = stages.open_experiment(config)
    parent = start_parent_run(
        experiment_id,
        f"{config.name}-{run_name}",
        config.model_dump(mode="json"),
        tags={
            "ftflow.prefect_flow_run_id": str(run_id),
            "ftflow.prefect_flow_run_name": run_name,
            "ftflow.prefect_ui": _prefect_ui_link(run_id),
            "ftflow.base_model": config.model.name_or_path,
            "ftflow.base_model_revision": config.model.revision or "default",
        },
    )
    log_text(parent, yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False, allow_unicode=True), "config/resolved_config.yaml")
    logger.info("MLflow run %s (%s) — outputs in %s", parent, os.environ.get("MLFLOW_TRACKING_URI"), out_dir)
    try:
        base = stages.prepare_base_model(config)
        data, cached = stages.run_cached(stages.convert_data, config, out_dir / "data")  # cached on content
        stages.record_data(config, data, cached, parent)
        tokens, cached = stages.run_cached(stages.tokenize, config, data.train_path, base)
        tokens = stages.record_tokens(tokens, cached, parent)
        with stages.gpu_slot(config):  # a second run waits here until the first one's training ends
            trained = stages.train(config, tokens, base, experiment_id, parent)
        model_dir = stages.consolidate(config, trained, base, tokens)
        fingerprint = sha256_json({"train": trained["train_key"], "name": config.registry.model_name})
        version = stages.register(
            config, model_dir, fingerprint, parent,
            tags={
                "ftflow.data_sha256": data.report["sha256"]["train"],
                "ftflow.tokenized_cache_key": tokens.key,
                "ftflow.base_model": config.model.name_or_path,
            },
        )
        champion_version = current_champion(config.registry.model_name)
        if champion_version and champion_version != version.version:
            champion_ref, champion_label = f"models:/{config.registry.model_name}/{champion_version}", f"champion v{champion_version}"
        else:
            champion_ref, champion_label = base.path, "base model"
        challenger = stages.evaluate(config, version.model_uri, data.eval_path, "challenger", experiment_id, parent)
        champion = stages.evaluate(config, champion_ref, data.eval_path, "champion", experiment_id, parent)
        decision = stages.promote(config, version, challenger, champion, champion_label,
                                  already_champion=champion_version == version.version, data_report=data.report)
    except BaseException:
        end_run(parent, "FAILED")
        raise
    end_run(parent)
    return {
        "registered_model": version.name,
        "version": version.version,
        "already_registered": version.existed,
        "compared_with": champion_label,
        "scores": {
            "challenger": _rounded(challenger["metrics"]),
            "champion": _rounded(champion["metrics"]),
        },
        "promoted": decision["promote"],
        "already_champion": bool(decision.get("already_champion")),
        "decision": decision["reason"],
        "tokenized_cache_hit": tokens.hit,
        "training": {k: trained.get(k) for k in ("global_step", "train_loss", "train_runtime_s", "world_size", "deepspeed_stage", "reused", "resumed_from")},
        "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
        "mlflow_run_id": parent,
        "mlflow_experiment_id": experiment_id,
        "prefect_flow_run_id": str(run_id),
        "prefect_api_url": os.environ.get("PREFECT_API_URL") or "ephemeral (local)",
        "outputs": str(out_dir),
        "model_dir": model_dir,
    }


def run_output_dir(name: str, flow_run_id: Any) -> Path:
    """Where a flow run's outputs and its log (`ftflow-run.log`) go: <FTFLOW_HOME>/runs/<name>/<flow-run-id>."""
    return state_dir() / "runs" / name / str(flow_run_id)


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def _prefect_ui_link(run_id: Any) -> str:
    api = os.environ.get("PREFECT_API_URL", "")
    return f"{api.removesuffix('/api')}/runs/flow-run/{run_id}" if api else "ephemeral (no UI)"
