"""What a person reads in the Prefect UI: the artifacts of the evaluate, promote and rollback flows and
the finetune flow's promotion decision, read back through the Prefect client from a real (test) server.

The flows run under `prefect_test_harness` (a temporary Prefect server and database) against a
fresh MLflow SQLite store; the model is the embedded tiny Qwen2, registered once per test that needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect import flow

from ftflow.config import GenerationConfigModel, load_config
from tasks.registry import RegisteredVersion, current_champion, record_eval, register_model

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "data/demo/reverse_eval.jsonl"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a busy 2-core machine needs more than 30 s
        yield


def _artifacts(state) -> dict[str, object]:
    """The artifacts of the flow run behind `state`, by key (table data decoded from JSON).

    Read through the Prefect client with a filter on flow_run_id. Not `client.read_artifacts`: it
    sends `null` for the filters it is not given, which this Prefect server (3.8.8 with FastAPI
    0.154) rejects with 422, and an empty task-run filter would drop the flow-level artifacts.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import Artifact

    flow_run_id = state.state_details.flow_run_id
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 50, "offset": 0}
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json=body)
    response.raise_for_status()
    found = [Artifact.model_validate(a) for a in response.json()]
    assert found and all(a.flow_run_id == flow_run_id for a in found)
    return {a.key: (json.loads(a.data) if a.type == "table" else a.data) for a in found}


def test_evaluate_flow_artifacts_hold_the_scores_and_examples(prefect_server, mlflow_sqlite, tiny_model_dir):
    import mlflow

    from flows.evaluate import evaluate
    from infra.local import ensure_experiment
    from tasks.evaluate import read_eval_jsonl

    rid = mlflow.MlflowClient().create_run(ensure_experiment("t")).info.run_id
    register_model(tiny_model_dir, model_name="m", run_id=rid, fingerprint="fp", tags={})
    state = evaluate("models:/m@challenger", str(EVAL), generation=GenerationConfigModel(max_new_tokens=3),
                     batch_size=2, max_samples=3, experiment="eval", return_state=True)
    res = state.result()
    art = _artifacts(state)
    assert set(art) == {"evaluation-metrics", "evaluation-examples"}

    md = art["evaluation-metrics"]
    assert "`models:/m@challenger` (version 1)" in md and res["run_id"] in md and "promotable" in md
    assert set(res["metrics"]) >= {"exact_match", "char_f1", "rouge_l", "bleu", "loss", "perplexity", "no_stop_rate"}
    for k, v in res["metrics"].items():
        assert f"| {k} | {v:.4f} |" in md, k

    rows = art["evaluation-examples"]
    assert [r["id"] for r in rows] == [r["id"] for r in read_eval_jsonl(EVAL, 3)]
    assert rows[0]["reference"] == "stone lemon apple forest" and "prompt" not in rows[0]
    assert sum(r["exact_match"] for r in rows) / 3 == pytest.approx(res["metrics"]["exact_match"])
    assert [r["stopped"] for r in rows] == [False] * 3  # random init never emits <|im_end|>


def test_eval_cli_runs_the_evaluate_flow(prefect_server, mlflow_sqlite, tiny_model_dir, capsys):
    from flows.evaluate import eval_cli

    assert eval_cli(str(tiny_model_dir), str(EVAL), 2, 2, 3, experiment="eval") == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "perplexity" in out and "recorded on" not in out  # a folder: nothing to tag
    assert eval_cli(str(tiny_model_dir), str(EVAL.with_name("missing.jsonl")), 2, 2, 3) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_cli(str(tiny_model_dir), str(EVAL), 2, 2, 3, generation={"max_new_token": 3}) == 2
    assert "max_new_token" in capsys.readouterr().err


def test_promote_and_rollback_flow_artifacts(prefect_server, mlflow_sqlite, bare_versions):
    from flows.promote import promote, rollback
    from tasks.registry import PromotionRefused

    bare_versions("m", 3)
    record_eval("m", "1", run_id="run-one", metrics={"exact_match": 0.25, "char_f1": 0.5, "n": 4.0})
    record_eval("m", "2", run_id="run-two", metrics={"exact_match": 0.75, "char_f1": 0.625, "n": 4.0})

    state = promote("m", "1", why="first release", who="alice", return_state=True)
    md = _artifacts(state)["manual-promotion"]
    assert "## m: champion none → 1" in md and "manual promotion (scored by run run-one)" in md
    assert "| who | alice (prefect flow run " in md and "| why | first release |" in md
    assert "| exact_match | 0.2500 | – | – |" in md and "| n |" not in md

    state = promote("m", "2", why="better replies", who="bob", return_state=True)
    md = _artifacts(state)["manual-promotion"]
    assert "## m: champion 1 → 2" in md and "scored by run run-two" in md
    assert "| metric | version 2 | previous champion 1 | delta |" in md
    assert "| exact_match | 0.7500 | 0.2500 | +0.5000 |" in md and "| char_f1 | 0.6250 | 0.5000 | +0.1250 |" in md

    with pytest.raises(PromotionRefused):  # unscored: refused, champion unchanged
        promote("m", "3", why="untested")
    assert current_champion("m") == "2"

    state = rollback("m", why="bad replies", who="carol", return_state=True)
    md = _artifacts(state)["rollback"]
    assert "## m: champion 2 → 1 (rollback)" in md
    assert "| previous champion | 2 |" in md and "| new champion | 1 |" in md
    assert "| who | carol (prefect flow run " in md and "| why | bad replies |" in md
    assert current_champion("m") == "1"


def test_finetune_promotion_decision_artifact(prefect_server, mlflow_sqlite, bare_versions):
    """The finetune flow's `promote` stage, called from a one-step flow with literal scores."""
    from tasks import stages

    @flow(name="decide")
    def decide(cfg, version, challenger, champion, label, already_champion=False):
        return stages.promote(cfg, version, challenger, champion, label, already_champion=already_champion)

    cfg = load_config(REPO / "configs/demo.yaml")
    bare_versions("m", 2)
    champion = {"metrics": {"exact_match": 0.5, "char_f1": 0.75}, "run_id": "r-base"}
    worse = {"metrics": {"exact_match": 0.25, "char_f1": 0.8}, "run_id": "r-1"}
    state = decide(cfg, RegisteredVersion("m", "1", "", False, "models:/m/1"), worse, champion, "base model",
                   return_state=True)
    assert state.result()["promote"] is False
    md = _artifacts(state)["promotion-decision"]
    assert "## m version 1: **not promoted**" in md
    assert "exact_match changed by -0.2500, not more than the required 0" in md
    assert "compared with: base model" in md and "| metric | challenger | base model | delta |" in md
    assert "| exact_match ⬅ | 0.2500 | 0.5000 | -0.2500 |" in md and "| char_f1 | 0.8000 | 0.7500 | +0.0500 |" in md

    better = {"metrics": {"exact_match": 0.75, "char_f1": 0.8}, "run_id": "r-2"}
    state = decide(cfg, RegisteredVersion("m", "2", "", False, "models:/m/2"), better, champion, "base model",
                   return_state=True)
    md = _artifacts(state)["promotion-decision"]
    assert "## m version 2: promoted to **champion**" in md and "exact_match improved by +0.2500 (> 0)" in md
    assert "| exact_match ⬅ | 0.7500 | 0.5000 | +0.2500 |" in md
    assert current_champion("m") == "2"
    import mlflow

    desc = mlflow.MlflowClient().get_model_version("m", "2").description  # the scorecard, in the registry
    assert desc.startswith("### m version 2: promoted to **@champion**") and "| exact_match ⬅ | 0.7500 | 0.5000 | +0.2500 |" in desc

    # the same config run again: version 2 is @champion already; compared with the base model for
    # reference, it "wins", and still nothing moves. Log, artifact and registry say so alike.
    state = decide(cfg, RegisteredVersion("m", "2", "", True, "models:/m/2"), better, champion, "base model",
                   already_champion=True, return_state=True)
    decision = state.result()
    assert decision["promote"] is False and decision["already_champion"] is True
    assert decision["reason"].startswith("version 2 is already @champion; nothing moved (compared with the base model")
    md = _artifacts(state)["promotion-decision"]
    assert "## m version 2: already **champion** (nothing moved)" in md and "PROMOTED" not in md
    assert current_champion("m") == "2"
    # the registry keeps the scorecard of the decision that made it champion
    assert mlflow.MlflowClient().get_model_version("m", "2").description == desc
