"""Register ftflow's Prefect deployments on the server PREFECT_API_URL points at.

    python -m infra.deploy                          # after `make up`: the local stack's pool `ftflow`
    PREFECT_API_URL=https://prefect.example/api python -m infra.deploy --pool gpu-pool --source /srv/ftflow

Deployments (parameters typed, so the Prefect UI shows a form for each):
    finetune/nightly    flow `finetune`  on a cron schedule (FTFLOW_FINETUNE_CRON, default "0 2 * * *" UTC);
                        default parameters: the pipeline config file given by --config (configs/demo.yaml)
    evaluate/on-demand  flow `evaluate`  no schedule (run from the UI or `prefect deployment run`)
    promote/on-demand   flow `promote`   no schedule
    rollback/on-demand  flow `rollback`  no schedule

`--source` is where workers find the code: this checkout's path by default (a worker on another
machine needs the same path, or a git URL here). Workers run flows in that folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftflow.utils import PROJECT_ROOT

log = logging.getLogger("ftflow.deploy")

NIGHTLY = "0 2 * * *"


@dataclass(frozen=True)
class Spec:
    flow: str
    name: str
    entrypoint: str
    description: str
    scheduled: bool = False


SPECS = (
    Spec("finetune", "nightly", "flows/finetune.py:finetune",
         "The whole pipeline: data, tokens, DeepSpeed training, MLflow version, scored comparison, promotion.", True),
    Spec("evaluate", "on-demand", "flows/evaluate.py:evaluate", "Scored inference of one model on one eval file."),
    Spec("promote", "on-demand", "flows/promote.py:promote", "Move @champion to a scored version (who and why recorded)."),
    Spec("rollback", "on-demand", "flows/promote.py:rollback", "Move @champion back to the previous champion."),
)


def finetune_defaults(config_path: str | Path) -> dict[str, Any]:
    """The `config` parameter's default: a pipeline config file, validated, as JSON."""
    from ftflow.config import load_config

    return {"config": load_config(config_path).model_dump(mode="json")}


def deploy_all(
    pool: str,
    *,
    source: str = str(PROJECT_ROOT),
    cron: str = NIGHTLY,
    timezone: str = "UTC",
    config_path: str | Path = PROJECT_ROOT / "configs" / "demo.yaml",
    paused: bool = False,
) -> dict[str, str]:
    """Create or update every deployment whose flow file exists; returns {"flow/name": deployment id}."""
    from prefect import Flow
    from prefect.schedules import Cron

    out: dict[str, str] = {}
    local = "://" not in source and not source.startswith("git@")
    for spec in SPECS:
        if local and not (Path(source) / spec.entrypoint.split(":")[0]).exists():
            log.warning("skipping %s/%s: %s is not in %s", spec.flow, spec.name, spec.entrypoint, source)
            continue
        flow = Flow.from_source(source=source, entrypoint=spec.entrypoint)
        # `to_deployment().apply()`, not `flow.deploy()`: the latter's online-worker check sends a
        # request the 3.8.8 server rejects (422 on workers/filter); apply() registers the same thing.
        deployment = flow.to_deployment(
            name=spec.name,
            work_pool_name=pool,
            schedules=[Cron(cron, timezone=timezone)] if spec.scheduled else None,
            paused=paused if spec.scheduled else None,
            parameters=finetune_defaults(config_path) if spec.flow == "finetune" else None,
            description=spec.description,
            tags=["ftflow"],
        )
        dep_id = deployment.apply(work_pool_name=pool)
        out[f"{spec.flow}/{spec.name}"] = str(dep_id)
        log.info("deployed %s/%s (%s) on pool %s%s", spec.flow, spec.name, dep_id, pool,
                 f", cron '{cron}' {timezone}" if spec.scheduled else ", on demand")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=os.environ.get("FTFLOW_WORK_POOL", "ftflow"), help="work pool (default ftflow)")
    ap.add_argument("--source", default=str(PROJECT_ROOT), help="code location workers use (path or git URL)")
    ap.add_argument("--cron", default=os.environ.get("FTFLOW_FINETUNE_CRON", NIGHTLY), help=f"finetune schedule (default '{NIGHTLY}')")
    ap.add_argument("--timezone", default=os.environ.get("FTFLOW_FINETUNE_TZ", "UTC"))
    ap.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "demo.yaml"), help="finetune's default parameters")
    ap.add_argument("--paused", action="store_true", help="create the nightly schedule paused")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not os.environ.get("PREFECT_API_URL"):
        log.error("PREFECT_API_URL is not set: run `make up` and `eval \"$(python -m infra.stack env)\"`, "
                  "or point it at your Prefect server")
        return 2
    deploy_all(a.pool, source=a.source, cron=a.cron, timezone=a.timezone, config_path=a.config, paused=a.paused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
