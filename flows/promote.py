"""Promotion and rollback by a person, as Prefect flows (and `ftflow promote` / `ftflow rollback`).

    ftflow promote ftflow-demo 3 --why "passed manual review"
    ftflow rollback ftflow-demo --why "bad replies in production"

`promote` refuses a version without a scored inference run (the finetune flow or `ftflow eval`
records one on the version) unless `force`. Both record who and why as model-version tags
(`ftflow.promotion.*`, `ftflow.rollback.*`) and as a Prefect artifact. `why` is required (an audit
trail wants a reason), in the CLI and in the deployments alike. `version` is an integer, so
`prefect deployment run 'promote/on-demand' -p model_name=ftflow-demo -p version=1 -p why="..."`
works as written.

The CLI checks what the registry can refuse (no such model or version, unscored, nothing to roll
back) before the flow starts, so a refusal is one `error:` line, not a failed flow run's tracebacks.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

from pydantic import Field

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import monitor
from infra.local import configure_environment
from tasks.registry import (
    PromotionRefused, current_user, manual_promotion_markdown, promotable_version, promote_version, rollback_champion,
    rollback_markdown, rollback_target,
)

# Registry writes are tags and an alias move: safe to repeat, so transient errors are retried
# inside tasks.registry (call_with_retry); a refusal is final and never retried.
promote_task = task(promote_version, name="promote-version", retries=0)
rollback_task = task(rollback_champion, name="rollback-champion", retries=0)


# Typed flow parameters: the Prefect UI shows a form, and `prefect deployment run -p` values are checked.
Version = Annotated[int, Field(ge=1, description="Version number in the MLflow registry, e.g. 3.")]
Why = Annotated[str, Field(pattern=r"\S", description="Why (recorded on the version for the audit trail).")]


def _who(who: str | None) -> str:
    return f"{who or current_user()} (prefect flow run {flow_run.get_id() or 'local'})"


@flow(name="promote", log_prints=False)
def promote(model_name: str, version: Version, why: Why, force: bool = False, who: str | None = None) -> dict[str, Any]:
    """Point `@champion` of `model_name` at `version`. Refused for an unscored version unless `force`."""
    r = promote_task(model_name, str(version), force=force, why=why, who=_who(who))
    create_markdown_artifact(key="manual-promotion", markdown=manual_promotion_markdown(r), description="Manual promotion")
    monitor.model_promoted_by_hand(model_name, r)
    get_run_logger().info("%s: champion %s -> %s (%s)", model_name, r["previous_champion"], r["version"], why)
    return r


@flow(name="rollback", log_prints=False)
def rollback(model_name: str, why: Why, who: str | None = None) -> dict[str, Any]:
    """Move `@champion` of `model_name` back to the version the current champion replaced."""
    r = rollback_task(model_name, why=why, who=_who(who))
    create_markdown_artifact(key="rollback", markdown=rollback_markdown(r), description="Rollback")
    monitor.model_rolled_back(model_name, r)
    get_run_logger().info("%s: champion %s -> %s (rollback: %s)", model_name, r["from"], r["to"], why)
    return r


def promote_cli(name: str, version: str, force: bool, why: str) -> int:
    """`ftflow promote NAME VERSION --why TEXT`: 0 promoted, 1 refused, 2 no such model or version."""
    configure_environment()
    try:
        promotable_version(name, str(version), force=force)  # refusals before any flow run starts
        r = promote(name, int(version), why=why, force=force)
    except LookupError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except PromotionRefused as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"{name}: champion {r['previous_champion'] or 'none'} -> {r['version']}\n")
    return 0


def rollback_cli(name: str, why: str) -> int:
    """`ftflow rollback NAME --why TEXT`: 0 rolled back, 1 refused, 2 no such model."""
    configure_environment()
    try:
        rollback_target(name)  # refusals before any flow run starts
        r = rollback(name, why=why)
    except LookupError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except PromotionRefused as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"{name}: champion {r['from']} -> {r['to']} (rollback)\n")
    return 0
