"""Watching a run and reacting to it, against a real Prefect server started here
(`prefect_test_harness`: API, event persister, reactive triggers and actions services).

One scenario per module, each step through the real entry points (`ftflow run`, `ftflow promote`,
`infra.deploy`'s automation functions):
  1. a webhook notification block pointed at a local HTTP server, and the ftflow automations
     "notify on failed finetune runs / training failures / promotions" through it;
  2. a small `ftflow run` that succeeds (12 optimizer steps, 2 ranks, MLflow system metrics every 1 s);
  3. a run made to fail in training (train.timeout_minutes=0.02 stops the ranks);
  4. `ftflow promote NAME 1 --force`.
Then the tests read what the server and MLflow hold: the events with their resource and payload,
the progress artifact at 100 %, the progress table, the system metrics, the webhook's messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

MODEL = "ftflow-monitor"
EVAL = REPO / "data/demo/reverse_eval.jsonl"
SMALL = ["train.epochs=1", "train.max_steps=12", "train.save_steps=40", "train.logging_steps=4", "eval.max_samples=4",
         "eval.mlflow_genai=false", f"registry.model_name={MODEL}"]


class Hook:
    """A local HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self):
        self.received: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, pred, timeout: float = 120.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = [m for m in self.received if pred(m)]
            if got:
                return got
            time.sleep(1)
        raise AssertionError(f"no matching notification after {timeout:.0f} s; received: {self.received}")


def _ftflow(home: Path, api_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(FTFLOW_HOME=str(home), PREFECT_API_URL=api_url, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    return subprocess.run([sys.executable, "-m", "ftflow.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)


def _api(method: str, path: str, body: Any = None) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        r = client.request(method, path, json=body)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from infra.deploy import apply_automations, automation_specs, deploy_all, notification_block_id

    home = tmp_path_factory.mktemp("monitor-home")
    hook = Hook()
    with prefect_test_harness(server_startup_timeout=180):
        api_url = PREFECT_API_URL.value()
        CustomWebhookNotificationBlock(name="ftflow-test", url=hook.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("ftflow-test-hook")
        with get_client(sync_client=True) as client:  # no worker polls it: a run started here stays Scheduled
            client.create_work_pool(WorkPoolCreate(name="monitor-pool", type="process"))
        deployed = deploy_all("monitor-pool")
        automations = apply_automations(automation_specs(
            evaluate_deployment_id=deployed["evaluate/on-demand"], evaluate_data=str(EVAL),
            notify_block_id=notification_block_id("custom-webhook/ftflow-test-hook"), notify_on=("failed", "promoted")))
        ok_summary = home / "ok.json"
        ok = _ftflow(home, api_url, "run", "configs/demo.yaml", *sum((["--set", s] for s in SMALL), []),
                     "--summary-json", str(ok_summary))
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-6000:]
        failed = _ftflow(home, api_url, "run", "configs/demo.yaml", *sum((["--set", s] for s in SMALL), []),
                         "--set", "train.seed=3", "--set", "train.timeout_minutes=0.02")
        assert failed.returncode != 0, (failed.stdout + failed.stderr)[-4000:]
        promoted = _ftflow(home, api_url, "promote", MODEL, "1", "--force", "--why", "monitor test")
        assert promoted.returncode == 0, (promoted.stdout + promoted.stderr)[-4000:]
        yield {"home": home, "hook": hook, "summary": json.loads(ok_summary.read_text()), "failed_log": failed.stdout + failed.stderr,
               "automations": automations, "deployed": deployed}
    hook.server.shutdown()


def _events(prefix: str, timeout: float = 60.0, want: int = 1) -> list[dict[str, Any]]:
    """ftflow events from the server's events API (the persister writes them a few seconds late)."""
    end = time.monotonic() + timeout
    while True:
        found = _api("POST", "/events/filter", {"filter": {"event": {"prefix": [prefix]}}, "limit": 50})["events"]
        if len(found) >= want or time.monotonic() > end:
            return found
        time.sleep(2)


def test_the_automations_are_created_once_per_name(scenario):
    assert sorted(scenario["automations"]) == ["ftflow: evaluate registered versions", "ftflow: notify on failed finetune runs",
                                                "ftflow: notify on promotions", "ftflow: notify on training failures"]
    names = [a["name"] for a in _api("POST", "/automations/filter", {})]
    assert sorted(names) == sorted(scenario["automations"])


def test_registered_and_promotion_events_carry_the_model_and_scores(scenario):
    s = scenario["summary"]
    run_id = s["prefect_flow_run_id"]
    (reg,) = [e for e in _events("ftflow.model.registered") if e["payload"]["mlflow_run_id"] == s["mlflow_run_id"]]
    assert reg["resource"]["prefect.resource.id"] == f"ftflow.model.{MODEL}.{s['version']}"
    assert reg["resource"]["ftflow.model.name"] == MODEL and reg["resource"]["ftflow.model.version"] == str(s["version"])
    assert reg["payload"]["model_uri"] == f"models:/{MODEL}/{s['version']}" and reg["payload"]["already_registered"] is False
    # Prefect relates an event emitted inside a task run to its flow run
    assert f"prefect.flow-run.{run_id}" in [r["prefect.resource.id"] for r in reg["related"]]

    name = "ftflow.model.promoted" if s["promoted"] else "ftflow.model.not-promoted"
    decided = [e for e in _events(name) if any(r["prefect.resource.id"] == f"prefect.flow-run.{run_id}" for r in e["related"])]
    assert len(decided) == 1, decided
    p = decided[0]["payload"]
    assert p["reason"] == s["decision"] and p["compared_with"] == s["compared_with"]
    for who in ("challenger", "champion"):
        for k, v in s["scores"][who].items():
            if isinstance(v, float):
                assert p["scores"][who][k] == pytest.approx(v, abs=1e-4), (who, k)


def test_a_failed_training_emits_training_failed(scenario):
    (ev,) = _events("ftflow.training.failed")
    assert ev["resource"]["prefect.resource.id"] == f"ftflow.model.{MODEL}"
    assert "train.timeout_minutes=0.02" in ev["payload"]["error"]
    assert ev["payload"]["train_dir"] and ev["payload"]["mlflow_run_id"]


def test_the_manual_promotion_emits_promoted(scenario):
    evs = [e for e in _events("ftflow.model.promoted") if e["payload"].get("why") == "monitor test"]
    assert len(evs) == 1 and evs[0]["resource"]["prefect.resource.id"] == f"ftflow.model.{MODEL}.1"


def test_the_progress_artifact_ends_at_100_and_the_table_follows_the_logging_steps(scenario):
    run_id = scenario["summary"]["prefect_flow_run_id"]
    arts = _api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 100})
    progress = [a for a in arts if a["key"] == "training-progress"]
    assert len(progress) == 1 and progress[0]["type"] == "progress"
    assert float(progress[0]["data"]) == 100.0
    assert "step 12/12" in progress[0]["description"]
    tables = sorted((a for a in arts if a["key"] == "training-progress-table"), key=lambda a: a["created"])
    assert tables, [a["key"] for a in arts]
    rows = json.loads(tables[-1]["data"])
    # logging_first_step + every 4th step: 1, 4, 8, 12
    assert [r["step"] for r in rows] == ["1/12", "4/12", "8/12", "12/12"]
    assert all(r["loss"] > 0 and r["learning_rate"] is not None and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["eta"] == "0:00:00"
    assert len(tables) <= 4  # rate-limited: never more versions than logging steps


def test_the_train_run_records_mlflow_system_metrics(scenario):
    import mlflow

    s = scenario["summary"]
    client = mlflow.MlflowClient(f"sqlite:///{scenario['home'] / 'mlflow.db'}")
    (train,) = client.search_runs([s["mlflow_experiment_id"]], f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}' "
                                                                 "and tags.mlflow.runName = 'train'")
    metrics = train.data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_megabytes", "system/network_receive_megabytes"):
        assert key in metrics, sorted(metrics)
    assert 0 < metrics["system/system_memory_usage_megabytes"]
    assert "loss" in metrics  # the ranks' loss curve is still there
    history = client.get_metric_history(train.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2  # sampled through the training, not once


def test_the_webhook_receives_the_failure_and_promotion_notifications(scenario):
    hook = scenario["hook"]
    failed_run = hook.wait_for(lambda m: "finetune run" in m["subject"] and "Failed" in m["subject"])
    assert "train.timeout_minutes=0.02" in failed_run[0]["body"] or "training" in failed_run[0]["body"].lower()
    training = hook.wait_for(lambda m: f"training of {MODEL} failed" in m["subject"])
    assert "train.timeout_minutes=0.02" in training[0]["body"]
    promoted = hook.wait_for(lambda m: f"{MODEL} v1 is @champion" in m["subject"] and "manual promotion" in m["body"])
    assert len(promoted) == 1


def test_a_registered_version_starts_the_evaluate_deployment_for_it(scenario):
    """The automation's templated parameters name the version the event was about. No worker polls
    the test's pool, so the flow run it creates is checked (Scheduled), not executed."""
    dep = scenario["deployed"]["evaluate/on-demand"]
    end = time.monotonic() + 120
    while True:
        runs = _api("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep]}}})
        if runs or time.monotonic() > end:
            break
        time.sleep(2)
    assert len(runs) == 1, runs
    assert runs[0]["parameters"]["model"] == f"models:/{MODEL}/{scenario['summary']['version']}"
    assert runs[0]["parameters"]["data"] == str(EVAL)


def test_a_long_stage_progress_artifact_ends_at_100(scenario):
    """StageProgress (scored inference) against the real server: created once the stage runs long
    (here after 0 s), updated in place, 100 % at the end."""
    from prefect import flow

    from flows.monitor import StageProgress

    @flow(name="stage-progress-check")
    def scored() -> None:
        p = StageProgress("evaluation-progress-challenger", "Scored inference", after_s=0.0, interval_s=0.0)
        for done in range(1, 5):
            p.update(done, 4)
        p.close()

    state = scored(return_state=True)
    arts = _api("POST", "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}, "limit": 10})
    assert [(a["key"], a["type"], float(a["data"])) for a in arts] == [("evaluation-progress-challenger", "progress", 100.0)]
    assert arts[0]["description"] == "Scored inference: 4/4"
