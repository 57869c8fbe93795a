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

Automations (each opt-in; re-running replaces them, by name):
    --evaluate-registered FILE   on `ftflow.model.registered`: run evaluate/on-demand on that version, data FILE
    --notify-block TYPE/NAME     a notification block (e.g. custom-webhook/ftflow-alerts) to send through on
    --notify-on EVENTS           failed (a failed/crashed finetune run, or ftflow.training.failed),
                                 promoted (ftflow.model.promoted); default: failed,promoted
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


# ------------------------------------------------------------------------------------------ automations

AUTOMATION_PREFIX = "ftflow: "
NOTIFY_ON = ("failed", "promoted")
_MODEL_URI = "models:/{{ event.resource['ftflow.model.name'] }}/{{ event.resource['ftflow.model.version'] }}"


def automation_specs(*, evaluate_deployment_id: str | None = None, evaluate_data: str | None = None,
                     notify_block_id: str | None = None, notify_on: tuple[str, ...] = NOTIFY_ON) -> list[Any]:
    """The automations asked for, as `prefect.automations.Automation` objects (not created yet)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment, SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    def on(events: set[str], **kw: Any) -> EventTrigger:
        return EventTrigger(expect=events, posture=Posture.Reactive, threshold=1, within=timedelta(0), **kw)

    out = []
    if evaluate_deployment_id:
        out.append(Automation(
            name=AUTOMATION_PREFIX + "evaluate registered versions",
            description="On ftflow.model.registered, score the new version with the evaluate/on-demand deployment.",
            trigger=on({"ftflow.model.registered"}, match={"prefect.resource.id": "ftflow.model.*"}),
            actions=[RunDeployment(source="selected", deployment_id=evaluate_deployment_id, parameters={
                "model": {"__prefect_kind": "jinja", "template": _MODEL_URI}, "data": evaluate_data})],
        ))
    if notify_block_id:
        unknown = set(notify_on) - set(NOTIFY_ON)
        if unknown:
            raise ValueError(f"--notify-on: unknown {sorted(unknown)}; choose from {', '.join(NOTIFY_ON)}")
        if "failed" in notify_on:
            out.append(Automation(
                name=AUTOMATION_PREFIX + "notify on failed finetune runs",
                description="A finetune flow run failed, crashed or timed out.",
                trigger=on({"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"},
                           match={"prefect.resource.id": "prefect.flow-run.*"},
                           match_related={"prefect.resource.role": "flow", "prefect.resource.name": "finetune"}),
                actions=[SendNotification(
                    block_document_id=notify_block_id, subject="ftflow: finetune run {{ flow_run.name }} {{ flow_run.state.name }}",
                    body="Flow run {{ flow_run.name }} ({{ flow_run.id }}) of flow finetune ended {{ flow_run.state.name }}: "
                         "{{ flow_run.state.message }}")],
            ))
            out.append(Automation(
                name=AUTOMATION_PREFIX + "notify on training failures",
                description="ftflow.training.failed: the training ranks of a run failed.",
                trigger=on({"ftflow.training.failed"}, match={"prefect.resource.id": "ftflow.model.*"}),
                actions=[SendNotification(
                    block_document_id=notify_block_id,
                    subject="ftflow: training of {{ event.resource['ftflow.model.name'] }} failed",
                    body="Training of {{ event.resource['ftflow.model.name'] }} failed: {{ event.payload.error }} "
                         "(training folder {{ event.payload.train_dir }})")],
            ))
        if "promoted" in notify_on:
            out.append(Automation(
                name=AUTOMATION_PREFIX + "notify on promotions",
                description="ftflow.model.promoted: @champion moved to a new version.",
                trigger=on({"ftflow.model.promoted"}, match={"prefect.resource.id": "ftflow.model.*"}),
                actions=[SendNotification(
                    block_document_id=notify_block_id,
                    subject="ftflow: {{ event.resource['ftflow.model.name'] }} v{{ event.resource['ftflow.model.version'] }} is @champion",
                    body="{{ event.resource['ftflow.model.name'] }} version {{ event.resource['ftflow.model.version'] }} "
                         "was promoted to @champion: {{ event.payload.reason }}")],
            ))
    return out


def notification_block_id(slug: str) -> str:
    """The id of the notification block `TYPE/NAME` (as `prefect block ls` shows it)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    type_slug, _, name = slug.partition("/")
    if not type_slug or not name:
        raise ValueError(f"--notify-block {slug!r}: give it as BLOCK-TYPE/NAME, e.g. custom-webhook/ftflow-alerts "
                         "(`prefect block ls` lists them)")
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(name=name, block_type_slug=type_slug)
        except ObjectNotFound:
            raise ValueError(f"--notify-block {slug!r}: no such block on the server; create it first "
                             "(Prefect UI > Blocks, or `CustomWebhookNotificationBlock(...).save(NAME)`)") from None
    return str(doc.id)


def apply_automations(automations: list[Any]) -> dict[str, str]:
    """Create each automation, replacing any of the same name (so re-deploying never duplicates one)."""
    from prefect.client.orchestration import get_client

    out = {}
    with get_client(sync_client=True) as client:
        for a in automations:
            for old in client.read_automations_by_name(a.name):
                client.delete_automation(old.id)
            a.create()
            out[a.name] = str(a.id)
            log.info("automation %r (%s)", a.name, a.id)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=os.environ.get("FTFLOW_WORK_POOL", "ftflow"), help="work pool (default ftflow)")
    ap.add_argument("--source", default=str(PROJECT_ROOT), help="code location workers use (path or git URL)")
    ap.add_argument("--cron", default=os.environ.get("FTFLOW_FINETUNE_CRON", NIGHTLY), help=f"finetune schedule (default '{NIGHTLY}')")
    ap.add_argument("--timezone", default=os.environ.get("FTFLOW_FINETUNE_TZ", "UTC"))
    ap.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "demo.yaml"), help="finetune's default parameters")
    ap.add_argument("--paused", action="store_true", help="create the nightly schedule paused")
    ap.add_argument("--evaluate-registered", metavar="FILE",
                    help="automation: score every newly registered version on this eval JSONL (evaluate/on-demand)")
    ap.add_argument("--notify-block", metavar="TYPE/NAME", help="automation: notify through this Prefect notification block")
    ap.add_argument("--notify-on", default=",".join(NOTIFY_ON), help="with --notify-block: failed,promoted (default both)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not os.environ.get("PREFECT_API_URL"):
        log.error("PREFECT_API_URL is not set: run `make up` and `eval \"$(python -m infra.stack env)\"`, "
                  "or point it at your Prefect server")
        return 2
    deployed = deploy_all(a.pool, source=a.source, cron=a.cron, timezone=a.timezone, config_path=a.config, paused=a.paused)
    if a.evaluate_registered or a.notify_block:
        try:
            data = str(Path(a.evaluate_registered).resolve()) if a.evaluate_registered else None
            if data and not Path(data).is_file():
                raise ValueError(f"--evaluate-registered {a.evaluate_registered}: no such file")
            if data and "evaluate/on-demand" not in deployed:
                raise ValueError("--evaluate-registered needs the evaluate/on-demand deployment, which was not deployed")
            specs = automation_specs(
                evaluate_deployment_id=deployed.get("evaluate/on-demand") if data else None, evaluate_data=data,
                notify_block_id=notification_block_id(a.notify_block) if a.notify_block else None,
                notify_on=tuple(x.strip() for x in a.notify_on.split(",") if x.strip()))
        except ValueError as err:
            log.error("error: %s", err)
            return 2
        apply_automations(specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
