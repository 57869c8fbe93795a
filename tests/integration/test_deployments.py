"""ftflow as Prefect deployments on a real stack (`python -m infra.stack up` on free 127.0.0.1 ports):
deployed by `python -m infra.deploy`, triggered through the Prefect API, run by the stack's worker.

Two small `finetune` runs are triggered at once (seeds 1 and 2), then a third with seed 1 again;
the tests read what they left in Prefect and MLflow (see `infra.testing.deployed_stack`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from infra import testing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def stack():
    yield testing.deployed_stack()
    testing.stop_shared()


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _parent_run(stack, flow_run_id: str):
    import mlflow

    client = mlflow.MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("ftflow")
    runs = client.search_runs([exp.experiment_id], f"tags.`ftflow.prefect_flow_run_id` = '{flow_run_id}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return client, parents[0]


def test_deployments_have_typed_parameters_and_the_nightly_schedule(stack):
    deps = {d["flow_name"] + "/" + d["name"]: d for d in testing._deployments(stack)}
    assert {"finetune/nightly", "evaluate/on-demand", "promote/on-demand", "rollback/on-demand"} <= set(deps)
    nightly = deps["finetune/nightly"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert nightly["work_pool_name"] == "ftflow"
    # A pydantic model as the parameter: the UI renders its JSON schema as a form.
    schema = nightly["parameter_openapi_schema"]
    assert schema["properties"]["config"]["$ref"].endswith("PipelineConfig")
    assert "train" in schema["definitions"]["PipelineConfig"]["properties"]
    assert nightly["parameters"]["config"]["name"] == "demo"
    for name in ("evaluate/on-demand", "promote/on-demand"):
        assert deps[name]["schedules"] == [] and deps[name]["parameter_openapi_schema"]["properties"]
    assert {"model", "data"} <= set(deps["evaluate/on-demand"]["parameter_openapi_schema"]["required"])


def test_scheduler_creates_the_next_nightly_run(stack):
    import time

    dep_id = stack.deployments["finetune/nightly"]
    deadline = time.monotonic() + 90
    while True:  # the scheduler service runs every 5 s here (60 s by default)
        runs = stack.api("POST", "/flow_runs/filter", {
            "deployments": {"id": {"any_": [dep_id]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}, "tags": {"all_": ["auto-scheduled"]}},
        })
        if runs or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert runs, "no auto-scheduled run of finetune/nightly within 90 s"
    nxt = min(_ts(r["expected_start_time"]) for r in runs)
    assert (nxt.hour, nxt.minute) == (2, 0) and nxt > datetime.now(nxt.tzinfo)
    # Pause it again: a test stack must never start a full demo training at 02:00.
    stack.api("PATCH", f"/deployments/{dep_id}", {"paused": True})


def test_triggered_run_completes_with_artifacts_and_a_registered_version(stack):
    run = stack.runs["a"]
    assert run["state"]["type"] == "COMPLETED", (run["state"], stack.log("worker")[-5000:])
    arts = stack.api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {a["key"] for a in arts}
    assert {"data-report", "tokenize-stats", "training-summary", "promotion-decision"} <= keys, keys
    training = next(a for a in arts if a["key"] == "training-summary")
    assert "steps" in training["data"] and "MLflow run" in training["data"]

    client, parent = _parent_run(stack, run["id"])
    assert parent.data.tags["ftflow.prefect_flow_run_name"] == "stack-test-a"
    assert parent.data.tags["ftflow.prefect_ui"] == f"{stack.prefect_url}/runs/flow-run/{run['id']}"
    versions = client.search_model_versions(f"name = 'ftflow-stack' and run_id = '{parent.info.run_id}'")
    assert len(versions) == 1
    v = versions[0]
    assert v.tags["ftflow.data_sha256"] == parent.data.tags["ftflow.data_sha256"]
    assert client.get_model_version("ftflow-stack", v.version).status == "READY"


def test_two_runs_at_once_both_complete_train_one_at_a_time_and_never_clobber(stack):
    a, b = stack.runs["a"], stack.runs["b"]
    assert a["state"]["type"] == b["state"]["type"] == "COMPLETED", (a["state"], b["state"])
    windows = []
    for run in (a, b):
        train = [t for t in testing.task_runs(stack, run["id"]) if t["name"].rsplit("-", 1)[0] == "train"]
        assert len(train) == 1
        windows.append((_ts(train[0]["start_time"]), _ts(train[0]["end_time"])))
    (s1, e1), (s2, e2) = sorted(windows)
    assert e1 <= s2, f"training overlapped: {windows}"  # the `gpu` limit (1 slot) held the second back
    both_running = max(_ts(a["start_time"]), _ts(b["start_time"])) < min(_ts(a["end_time"]), _ts(b["end_time"]))
    assert both_running, "the two flow runs did not run at the same time, so nothing was tested"

    (ca, pa), (_, pb) = _parent_run(stack, a["id"]), _parent_run(stack, b["id"])
    versions = {pa.info.run_id: None, pb.info.run_id: None}
    for rid in versions:
        [versions[rid]] = [v.version for v in ca.search_model_versions(f"name = 'ftflow-stack' and run_id = '{rid}'")]
    assert len(set(versions.values())) == 2
    train_dirs = {p.data.tags.get("ftflow.tokenized_cache_key") for p in (pa, pb)}
    assert len(train_dirs) == 1  # same data -> the same tokenized cache, shared read-only
    # Each run writes under its own flow-run folder; when convert-data came from Prefect's cache,
    # the run reads the earlier run's folder instead (read-only), which the tag records.
    data_dirs = [Path(p.data.tags["ftflow.data_dir"]) for p in (pa, pb)]
    assert all((d / "train.jsonl").exists() or any(d.glob("*.jsonl")) for d in data_dirs), data_dirs
    assert all(d.parent.name in (a["id"], b["id"]) for d in data_dirs), data_dirs
    trains = sorted(p.name for p in (Path(stack.home) / "train").iterdir() if p.name.startswith("demo-"))
    assert len(trains) == 2  # seed is in the training key: one folder per run, each with its own export
    assert all((Path(stack.home) / "train" / t / "export" / "model.safetensors").exists() for t in trains)


def test_rerun_shows_convert_and_tokenize_as_cached(stack):
    c = stack.runs["c"]
    assert c["state"]["type"] == "COMPLETED", c["state"]
    by_name = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in testing.task_runs(stack, c["id"])}
    assert by_name["convert-data"] == "Cached", by_name
    assert by_name["tokenize"] == "Cached", by_name
    assert by_name["train"] == "Completed"
    _, parent = _parent_run(stack, c["id"])
    assert parent.data.tags["ftflow.tokenized_cache_hit"] == "True"
    assert "ftflow.data_sha256" in parent.data.tags  # lineage is still recorded on a cache hit
