"""A scored inference run as its own Prefect flow: one model, one eval file, one MLflow run.

    ftflow eval --model models:/ftflow-demo@champion --data data/demo/reverse_eval.jsonl

The model is a registry reference (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), a model folder or
a hub id. A registered version scored here is tagged with this run (`ftflow.eval.run_id` and its
metrics), which is what `ftflow promote` asks for before it moves `@champion`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from ftflow.config import GenerationConfigModel
from infra.local import configure_environment, ensure_experiment
from tasks.evaluate import scored_inference_run

TABLE_ROWS = 100  # per-example rows shown in the Prefect artifact; MLflow holds the whole table

score = task(scored_inference_run, name="scored-inference", retries=0)


@flow(name="evaluate", log_prints=False)
def evaluate(
    model: str,
    data: str,
    generation: GenerationConfigModel = GenerationConfigModel(),
    batch_size: int = 32,
    max_samples: int | None = None,
    experiment: str = "ftflow",
    record: bool = True,
) -> dict[str, Any]:
    """Score `model` on the canonical JSONL `data` (last turn = reference); log the run to MLflow.

    `record`: tag a registered version with this run's scores (makes it promotable).
    """
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    res = score(
        model, data, gen=generation.model_dump(), batch_size=batch_size, max_samples=max_samples,
        experiment_id=ensure_experiment(experiment), run_name=f"eval-{flow_run.get_name() or 'local'}",
        tags={"ftflow.prefect_flow_run_id": run_id}, record=record,
    )
    metrics = res["metrics"]
    logger.info("%s on %s: %s (MLflow run %s)", model, data,
                {k: round(v, 4) for k, v in metrics.items()}, res["run_id"])
    create_markdown_artifact(key="evaluation-metrics", markdown=metrics_markdown(res), description=f"Scores of {model}")
    create_table_artifact(
        key="evaluation-examples",
        table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "prompt"}
               for row in res["rows"][:TABLE_ROWS]],
        description=f"Per-example scores of {model} on {data} (first {TABLE_ROWS}; all in MLflow run {res['run_id']})",
    )
    return {k: v for k, v in res.items() if k != "rows"}


def metrics_markdown(res: dict[str, Any]) -> str:
    version = res.get("model_version")
    lines = [
        f"## Scored inference: `{res['model_ref']}`" + (f" (version {version[1]})" if version else ""),
        "",
        f"MLflow run `{res['run_id']}`; data sha256 `{res['data_sha256'][:16]}`"
        + ("; recorded on the version (promotable)" if res.get("recorded") else ""),
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {k} | {v:.4f} |" for k, v in res["metrics"].items()),
    ]
    return "\n".join(lines) + "\n"


def eval_cli(model: str, data: str, max_samples: int | None, batch_size: int | None, max_new_tokens: int | None,
             generation: dict[str, Any] | None = None, experiment: str = "ftflow", record: bool = True) -> int:
    """`ftflow eval --model REF --data FILE`: run the `evaluate` flow and print the metrics."""
    from pydantic import ValidationError

    configure_environment()
    try:
        gen = GenerationConfigModel.model_validate(
            {**(generation or {}), **({"max_new_tokens": int(max_new_tokens)} if max_new_tokens else {})})
    except ValidationError as err:
        sys.stderr.write(f"error: generation settings: {err}" + "\n")
        return 2
    try:
        res = evaluate(model, data, generation=gen, batch_size=int(batch_size or 32), max_samples=max_samples,
                       experiment=experiment, record=record)
    except (FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"error: {err}" + "\n")
        return 2
    width = max(len(k) for k in res["metrics"])
    sys.stdout.write(f"{model} on {data} (MLflow run {res['run_id']} at {os.environ.get('MLFLOW_TRACKING_URI')})\n")
    for k, v in res["metrics"].items():
        sys.stdout.write(f"{k:<{width}}  {int(v):>10d}\n" if k == "n" else f"{k:<{width}}  {v:>10.4f}\n")
    if res.get("recorded"):
        name, version = res["model_version"]
        sys.stdout.write(f"recorded on {name} version {version}: "
                         f"`ftflow promote {name} {version}` may now move @champion\n")
    return 0
