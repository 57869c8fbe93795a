"""Registry stage: idempotent registration, aliases, pyfunc serving, promotion decisions and rollback."""

from __future__ import annotations

import pytest
import torch

from tasks import registry
from tasks.registry import (
    apply_promotion,
    call_with_retry,
    current_champion,
    decide_promotion,
    promote_cli,
    promotion_markdown,
    record_eval,
    register_model,
    rollback_cli,
)

CHAT = [{"role": "user", "content": "Reverse the words: apple river stone"}]


def _run(experiment: str = "t") -> str:
    import mlflow

    from infra.local import ensure_experiment

    return mlflow.MlflowClient().create_run(ensure_experiment(experiment)).info.run_id


def _versions(name: str) -> list[str]:
    import mlflow

    return sorted(str(mv.version) for mv in mlflow.MlflowClient().search_model_versions(f"name = '{name}'"))


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_serves_chat(mlflow_sqlite, noisy_model_dir):
    import mlflow

    from tasks.evaluate import generate_batch, load_for_inference

    rid = _run()
    first = register_model(noisy_model_dir, model_name="m", run_id=rid, fingerprint="fp1", tags={"base": "tiny"})
    again = register_model(noisy_model_dir, model_name="m", run_id=rid, fingerprint="fp1", tags={"base": "tiny"})
    assert (first.existed, again.existed) == (False, True)
    assert first.version == again.version == "1"
    assert first.model_uri == "models:/m/1"
    assert _versions("m") == ["1"]

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("m", "challenger")
    assert str(mv.version) == "1"
    assert mv.tags["ftflow.fingerprint"] == "fp1" and mv.tags["ftflow.run_id"] == rid and mv.tags["base"] == "tiny"
    assert client.get_run(rid).info.status == "RUNNING"  # registering does not finish the flow's run
    assert current_champion("m") is None

    # pyfunc serving by alias, with OpenAI-style chat input, offline
    pyf = mlflow.pyfunc.load_model("models:/m@challenger")
    out = pyf.predict({"messages": CHAT, "max_tokens": 6})
    choice = out[0]["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert out[0]["usage"]["completion_tokens"] <= 6

    # the registry copy is the same model as the folder it came from
    model, tok, local = load_for_inference("models:/m@challenger")
    ref_model, ref_tok, _ = load_for_inference(str(noisy_model_dir))
    gen = {"max_new_tokens": 6}
    assert generate_batch(model, tok, [CHAT], gen, 1) == generate_batch(ref_model, ref_tok, [CHAT], gen, 1)
    assert choice["message"]["content"] == generate_batch(model, tok, [CHAT], gen, 1)[0]["prediction"]
    assert load_for_inference("models:/m/1")[2] == local  # cached: one download per version


def test_failed_registration_moves_no_alias(mlflow_sqlite, tiny_model_dir, monkeypatch):
    import mlflow

    rid = _run()
    v1 = register_model(tiny_model_dir, model_name="m", run_id=rid, fingerprint="a", tags={})

    def boom(*a, **k):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(mlflow, "register_model", boom)
    with pytest.raises(RuntimeError):
        register_model(tiny_model_dir, model_name="m", run_id=rid, fingerprint="b", tags={})
    assert str(mlflow.MlflowClient().get_model_version_by_alias("m", "challenger").version) == v1.version
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite)
    from infra.local import ensure_experiment

    with mlflow.start_run(experiment_id=ensure_experiment("t")) as parent:  # another run active in this thread
        v2 = register_model(tiny_model_dir, model_name="m", run_id=rid, fingerprint="b", tags={})
        assert mlflow.active_run().info.run_id == parent.info.run_id
    assert (v2.version, v2.existed) == ("2", False)
    assert str(mlflow.MlflowClient().get_model_version_by_alias("m", "challenger").version) == "2"


def test_retry_only_transient():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert call_with_retry(flaky, base_delay=0) == "ok" and len(calls) == 3

    calls.clear()

    def bad():
        calls.append(1)
        raise MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        call_with_retry(bad, base_delay=0)
    assert len(calls) == 1


@pytest.mark.parametrize("budget, expected_calls", [("0", 1), ("2", 3), ("10", 5), ("30", 7)])
def test_retry_total_wait_is_bounded_by_the_budget(monkeypatch, budget, expected_calls):
    """FTFLOW_MLFLOW_RETRY_SECONDS bounds the total wait of one call: delays 0.5, 1, 2, 4, 8, 8, ... (+ up to
    25% jitter) are taken while their sum fits. With jitter at its maximum, budget 2 s allows 0.625 + 1.25
    (3 calls), 10 s allows 0.625 + 1.25 + 2.5 + 5 (5 calls), 30 s adds 10 + 10 (7 calls)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from tasks import registry

    slept: list[float] = []
    monkeypatch.setattr(registry.time, "sleep", slept.append)
    monkeypatch.setattr(registry.random, "random", lambda: 1.0)  # the largest jitter
    monkeypatch.setenv("FTFLOW_MLFLOW_RETRY_SECONDS", budget)
    calls = []

    def down():
        calls.append(1)
        raise MlflowException("connection refused", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(MlflowException):
        call_with_retry(down)
    assert len(calls) == expected_calls
    assert sum(slept) <= float(budget)
    assert max(slept, default=0) <= 10.0  # 8 s cap + 25% jitter


# --------------------------------------------------------------------------- promotion


@pytest.mark.parametrize(
    "chal, champ, kw, promote",
    [
        ({"exact_match": 0.6}, {"exact_match": 0.5}, {}, True),
        ({"exact_match": 0.4}, {"exact_match": 0.5}, {}, False),
        ({"exact_match": 0.5}, {"exact_match": 0.5}, {}, False),  # a tie is not an improvement
        ({"exact_match": 0.55}, {"exact_match": 0.5}, {"min_improvement": 0.1}, False),
        ({"exact_match": 0.65}, {"exact_match": 0.5}, {"min_improvement": 0.1}, True),
        ({"exact_match": 0.9, "char_f1": 0.7}, {"exact_match": 0.5, "char_f1": 0.8}, {"no_regress": ["char_f1"]}, False),
        ({"exact_match": 0.9, "char_f1": 0.8}, {"exact_match": 0.5, "char_f1": 0.8}, {"no_regress": ["char_f1"]}, True),
        ({"exact_match": 0.1}, None, {}, True),
    ],
)
def test_decide_promotion(chal, champ, kw, promote):
    args = {"metric": "exact_match", "min_improvement": 0.0, "no_regress": [], **kw}
    d = decide_promotion(chal, champ, **args)
    assert d["promote"] is promote
    assert d["metric"] == "exact_match" and d["challenger_score"] == chal["exact_match"]
    if champ is not None:
        assert d["delta"] == pytest.approx(chal["exact_match"] - champ["exact_match"])
    assert d["reason"]


def test_decide_promotion_names_missing_metric():
    with pytest.raises(KeyError, match="char_f1"):
        decide_promotion({"exact_match": 1.0}, {"exact_match": 0.0}, metric="char_f1", min_improvement=0, no_regress=[])


def test_a_registration_that_lost_a_race_keeps_the_first_version(mlflow_sqlite, noisy_model_dir, monkeypatch):
    # Two registrars of one model on machines that share only the MLflow server: both search, find
    # nothing, and create a version. Here the other one's version (1) is made between our search
    # (forced to miss) and our creation; ours (2) must go, and version 1 must be reported.
    import mlflow

    import tasks.registry as reg

    rid = _run()
    other = register_model(noisy_model_dir, model_name="m", run_id=rid, fingerprint="fp1", tags={})
    monkeypatch.setattr(reg, "_find_by_fingerprint", lambda *a, **k: None)
    ours = register_model(noisy_model_dir, model_name="m", run_id=_run(), fingerprint="fp1", tags={})
    assert (other.version, other.existed) == ("1", False)
    assert (ours.version, ours.existed, ours.run_id) == ("1", True, rid)
    assert _versions("m") == ["1"]
    assert str(mlflow.MlflowClient().get_model_version_by_alias("m", "challenger").version) == "1"
    # a different fingerprint is not a duplicate
    assert register_model(noisy_model_dir, model_name="m", run_id=_run(), fingerprint="fp2", tags={}).version == "3"
    assert _versions("m") == ["1", "3"]


def test_promotion_and_rollback(mlflow_sqlite, bare_versions):
    import mlflow

    bare_versions("m", 3)
    win = {"promote": True, "reason": "better", "metric": "exact_match", "challenger_score": 0.6,
           "champion_score": 0.5, "delta": 0.1}
    lose = {**win, "promote": False, "reason": "worse"}
    apply_promotion("m", "1", win)
    apply_promotion("m", "2", win, why="nightly")
    apply_promotion("m", "3", lose)
    assert current_champion("m") == "2"
    client = mlflow.MlflowClient()
    tags2 = client.get_model_version("m", "2").tags
    assert tags2["ftflow.promotion.previous_champion"] == "1"
    assert tags2["ftflow.promotion.why"] == "nightly"
    assert client.get_model_version("m", "3").tags["ftflow.promotion.promote"] == "false"

    assert rollback_cli("m", why="bad outputs") == 0
    assert current_champion("m") == "1"
    assert client.get_model_version("m", "2").tags["ftflow.rollback.to"] == "1"
    assert rollback_cli("m", why="again") == 1  # version 1 replaced nobody
    assert current_champion("m") == "1"


def test_promote_cli_requires_scored_version(mlflow_sqlite, capsys, bare_versions):
    bare_versions("m", 2)
    assert promote_cli("m", "1", force=False, why="") == 1
    assert "--force" in capsys.readouterr().err
    assert current_champion("m") is None
    assert promote_cli("m", "1", force=True, why="hotfix") == 0
    assert current_champion("m") == "1"
    record_eval("m", "2", run_id="r123", metrics={"exact_match": 0.9})
    assert registry.version_eval_metrics("m", "2") == {"exact_match": 0.9}
    assert promote_cli("m", "2", force=False, why="") == 0
    assert current_champion("m") == "2"
    assert promote_cli("m", "9", force=True, why="") == 2


def test_promotion_markdown():
    d = decide_promotion({"exact_match": 0.75, "char_f1": 0.9}, {"exact_match": 0.5, "char_f1": 0.8},
                         metric="exact_match", min_improvement=0.0, no_regress=[])
    md = promotion_markdown(d, {"exact_match": 0.75, "char_f1": 0.9}, {"exact_match": 0.5, "char_f1": 0.8}, "m", "3")
    assert "## m version 3: promoted to **champion**" in md
    assert "| exact_match ⬅ | 0.7500 | 0.5000 | +0.2500 |" in md
    assert "| char_f1 | 0.9000 | 0.8000 | +0.1000 |" in md


def test_promote_version_and_rollback_record_who_and_why(mlflow_sqlite, bare_versions):
    import mlflow

    from tasks.registry import PromotionRefused, promote_version, resolve_version, rollback_champion

    bare_versions("m", 2)
    with pytest.raises(PromotionRefused, match="no scored inference run"):
        promote_version("m", "1", force=False, why="", who="alice")
    with pytest.raises(LookupError, match=r"no version 7 \(versions: 1, 2\)"):
        promote_version("m", "7", force=True, why="", who="alice")
    with pytest.raises(PromotionRefused, match="no champion"):
        rollback_champion("m", why="", who="alice")
    r = promote_version("m", "1", force=True, why="hotfix", who="alice")
    assert (r["previous_champion"], r["forced"], r["scored_by"]) == (None, True, None)
    record_eval("m", "2", run_id="r9", metrics={"exact_match": 0.5})
    r = promote_version("m", "2", force=False, why="reviewed", who="bob")
    assert (r["previous_champion"], r["forced"], r["scores"]) == ("1", False, {"exact_match": 0.5})
    tags = mlflow.MlflowClient().get_model_version("m", "2").tags
    assert (tags["ftflow.promotion.who"], tags["ftflow.promotion.why"]) == ("bob", "reviewed")
    assert "scored by run r9" in tags["ftflow.promotion.reason"]
    assert mlflow.MlflowClient().get_model_version("m", "1").tags["ftflow.promotion.forced"] == "true"
    assert resolve_version("models:/m@champion") == ("m", "2") and resolve_version("/some/folder") is None

    r = rollback_champion("m", why="regression", who="carol")
    assert (r["from"], r["to"]) == ("2", "1") and current_champion("m") == "1"
    tags = mlflow.MlflowClient().get_model_version("m", "1").tags
    assert (tags["ftflow.rollback.restored_from"], tags["ftflow.rollback.restored_by"]) == ("2", "carol")


def test_already_champion_moves_nothing_and_keeps_its_record(mlflow_sqlite, bare_versions):
    """An unchanged config run again: its version is @champion already. Its promotion record (who, why,
    previous champion) is not overwritten, and the alias stays."""
    import mlflow

    bare_versions("m", 1)
    win = {"promote": True, "reason": "exact_match improved by +1.0000 (> 0)", "metric": "exact_match",
           "challenger_score": 1.0, "champion_score": 0.0, "delta": 1.0}
    apply_promotion("m", "1", win, why="first run")
    before = mlflow.MlflowClient().get_model_version("m", "1").tags
    apply_promotion("m", "1", win, why="the same run again")
    after = mlflow.MlflowClient().get_model_version("m", "1").tags
    assert after == before and after["ftflow.promotion.why"] == "first run"
    assert current_champion("m") == "1"
    # tags are what people filter by; the scores live in the description
    assert {k for k in after if k.startswith("ftflow.promotion.")} == {
        f"ftflow.promotion.{k}" for k in ("promote", "reason", "who", "why", "previous_champion")}


def test_version_description_is_its_scorecard(mlflow_sqlite, bare_versions):
    import mlflow

    from tasks.registry import describe_version, version_scorecard

    bare_versions("m", 2)
    decision = {"promote": False, "reason": "exact_match changed by +0.0000, not more than the required 0",
                "metric": "exact_match"}
    md = version_scorecard("m", "2", decision, {"exact_match": 0.8, "loss": 0.5, "n": 10},
                           {"exact_match": 0.8, "loss": 0.25, "n": 10}, compared_with="champion v1",
                           base_model="embedded:tiny-qwen2", data={"train data": "a.jsonl | b.jsonl", "train / eval rows": "90 / 10"})
    describe_version("m", "2", md)
    desc = mlflow.MlflowClient().get_model_version("m", "2").description
    lines = desc.splitlines()
    assert lines[0] == "### m version 2: **not promoted**"
    assert "| metric | version 2 | champion v1 | delta |" in lines
    assert "| exact_match ⬅ | 0.8000 | 0.8000 | +0.0000 |" in lines
    assert "| loss | 0.5000 | 0.2500 | +0.2500 |" in lines
    assert not any(ln.startswith("| n |") for ln in lines)  # a count, not a score
    assert f"| decision | **not promoted**: {decision['reason']} |" in lines
    assert "| base model | `embedded:tiny-qwen2` |" in lines and "| compared with | champion v1 |" in lines
    assert "| train data | `a.jsonl / b.jsonl` |" in lines  # a '|' in a value would break the table
    already = version_scorecard("m", "1", {**decision, "already_champion": True}, {"exact_match": 1.0}, {"exact_match": 0.0},
                                compared_with="base model", base_model="x")
    assert already.splitlines()[0] == "### m version 1: already **@champion**, nothing moved"
