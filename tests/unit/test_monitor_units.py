"""flows/monitor.py without a server: the events' names, resources and payloads; the progress
lines' parsing, the rate limit, resumed runs and the ETA. The real server is in
tests/integration/test_monitor.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows import monitor
from tasks.train import TrainingFailed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def sent(monkeypatch):
    import prefect.events

    out = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: out.append(kw) or kw)
    return out


def test_events_name_the_model_as_their_resource(sent):
    monitor.model_registered("m", "3", model_uri="models:/m/3", existed=False, run_id="r1", train_key="k")
    monitor.promotion_decided("m", "3", {"promote": False, "reason": "exact_match did not improve", "metric": "exact_match",
                                         "challenger_score": 0.5, "champion_score": 0.5, "delta": 0.0},
                              {"exact_match": 0.5, "note": "x"}, {"exact_match": 0.5})
    monitor.model_rolled_back("m", {"from": "3", "to": "2", "who": "ana", "why": "bad replies"})
    monitor.data_rejected_over_limit("m", {"rows_in": 10, "rejected": 4, "reject_fraction": 0.4, "by_reason": {"x": 4}}, 0.01, "msg")
    monitor.training_failed("m", TrainingFailed("rank 1 died", 1, -9, "tail"), train_dir="/t", mlflow_run_id="r2")

    assert [e["event"] for e in sent] == ["ftflow.model.registered", "ftflow.model.not-promoted", "ftflow.model.rolled-back",
                                          "ftflow.data.rejected-over-limit", "ftflow.training.failed"]
    assert sent[0]["resource"] == {"prefect.resource.id": "ftflow.model.m.3", "prefect.resource.name": "m v3",
                                   "ftflow.model.name": "m", "ftflow.model.version": "3"}
    assert sent[0]["payload"]["model_uri"] == "models:/m/3"
    assert sent[1]["payload"]["reason"] == "exact_match did not improve"
    assert sent[1]["payload"]["scores"] == {"challenger": {"exact_match": 0.5}, "champion": {"exact_match": 0.5}}
    assert sent[2]["resource"]["prefect.resource.id"] == "ftflow.model.m.2"  # the new champion
    assert sent[2]["payload"]["from"] == "3" and sent[2]["payload"]["why"] == "bad replies"
    assert sent[3]["resource"]["prefect.resource.id"] == "ftflow.model.m"  # no version exists yet
    assert sent[3]["payload"]["reject_fraction"] == 0.4 and sent[3]["payload"]["max_reject_fraction"] == 0.01
    assert sent[4]["payload"]["rank"] == 1 and sent[4]["payload"]["exit_code"] == -9
    assert "rank 1 died" in sent[4]["payload"]["error"]
    for e in sent:  # JSON-able: what the events API will store
        json.dumps(e["payload"])


def test_an_event_that_cannot_be_sent_never_fails_the_run(monkeypatch, caplog):
    import prefect.events

    def boom(**kw):
        raise ConnectionError("server gone")

    monkeypatch.setattr(prefect.events, "emit_event", boom)
    assert monitor.model_registered("m", 1, model_uri="u", existed=False) is None
    assert "could not emit Prefect event ftflow.model.registered" in caplog.text


def test_parse_progress_reads_rank0_lines_and_ignores_the_rest():
    line = '[default0]:2026-12-04 10:00:00 [rank0] INFO ftflow.train: FTFLOW_PROGRESS {"step": 3, "max_steps": 9, "loss": 1.5}'
    assert monitor.parse_progress(line) == {"step": 3, "max_steps": 9, "loss": 1.5}
    assert monitor.parse_progress("[default0]: step 3/9 {'loss': 1.5}") is None
    assert monitor.parse_progress("FTFLOW_PROGRESS {not json") is None
    assert monitor.parse_progress('FTFLOW_PROGRESS {"step": "3", "max_steps": 9}') is None


class Recorded(monitor.TrainingProgress):
    """The artifact writes recorded instead of sent (what was shown, and when)."""

    def __init__(self, clock):
        super().__init__("t", interval_s=5.0, clock=clock)
        self.writes = []

    def _write(self):
        self.writes.append((self.percent, list(self.rows)))
        self._pushed_step, self._pushed_rows = self.step, len(self.rows)


def test_progress_is_rate_limited_and_ends_at_the_last_step():
    now = [0.0]
    p = Recorded(lambda: now[0])
    p.feed('FTFLOW_PROGRESS {"step": 0, "max_steps": 100, "event": "begin"}')  # written (first)
    for step in range(1, 101):
        now[0] += 0.5  # a step every half second: 50 s in all
        extra = ', "loss": 2.0, "learning_rate": 1e-4, "tokens_per_s": 1000.0' if step % 10 == 0 else ""
        p.feed(f'FTFLOW_PROGRESS {{"step": {step}, "max_steps": 100{extra}}}')
    p.close()
    # one write at most every 5 s (+ the first and the closing one), never one per step
    assert 10 <= len(p.writes) <= 12
    assert p.writes[-1][0] == 100.0
    rows = p.writes[-1][1]
    assert [r["step"] for r in rows] == [f"{s}/100" for s in range(10, 101, 10)]
    assert rows[0]["eta"] == "0:00:45" and rows[0]["elapsed"] == "0:00:05"  # 10 steps in 5 s, 90 to go
    assert rows[-1]["eta"] == "0:00:00" and rows[-1]["loss"] == 2.0 and rows[-1]["tokens_per_s"] == 1000.0


def test_a_resumed_run_starts_where_it_resumes():
    now = [0.0]
    p = Recorded(lambda: now[0])
    p.feed('FTFLOW_PROGRESS {"step": 60, "max_steps": 100, "event": "begin"}')
    assert p.writes[0][0] == 60.0
    now[0] += 10.0
    p.feed('FTFLOW_PROGRESS {"step": 70, "max_steps": 100, "loss": 1.0}')
    # speed counted from the resumed step: 10 steps in 10 s, so 30 s to go (not 70 steps' worth)
    assert p.rows[-1]["eta"] == "0:00:30"


def test_a_reused_training_shows_done():
    p = Recorded(lambda: 0.0)
    p.reused(63)
    p.close()
    assert [w[0] for w in p.writes] == [100.0] and p.step == 63 and "reused" in p.description


def test_close_without_progress_writes_nothing():
    p = Recorded(lambda: 0.0)
    p.close()
    assert p.writes == []


def test_convert_over_the_reject_limit_emits_the_event(sent, tmp_path):
    """The `convert-data` task's own wiring: the run still fails with the DataError, and the event
    carries the counts of the report."""
    from ftflow.config import load_config
    from tasks.convert import DataError
    from tasks.stages import convert_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi again"}]}\n')  # no assistant turn: rejected
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.train=[{bad}]", "data.eval=[]", "data.max_reject_fraction=0.1",
                                                        "registry.model_name=m"])
    with pytest.raises(DataError, match="max_reject_fraction"):
        convert_data.fn(cfg, tmp_path / "out")
    (ev,) = [e for e in sent if e["event"] == "ftflow.data.rejected-over-limit"]
    assert ev["resource"]["prefect.resource.id"] == "ftflow.model.m"
    assert (ev["payload"]["rows_in"], ev["payload"]["rejected"], ev["payload"]["reject_fraction"]) == (2, 1, 0.5)
    assert ev["payload"]["by_reason"] == {"no_assistant_turn": 1} and ev["payload"]["max_reject_fraction"] == 0.1


def test_deploy_refuses_unknown_notification_settings():
    from infra.deploy import automation_specs, notification_block_id

    with pytest.raises(ValueError, match="BLOCK-TYPE/NAME"):
        notification_block_id("ftflow-alerts")
    with pytest.raises(ValueError, match="choose from failed, promoted"):
        automation_specs(notify_block_id="00000000-0000-0000-0000-000000000001", notify_on=("failed", "registerd"))
    assert automation_specs() == []  # nothing is created unless asked for


class RecordedStage(monitor.StageProgress):
    def __init__(self, clock):
        super().__init__("evaluation-progress-challenger", "eval", after_s=5.0, interval_s=5.0, clock=clock)
        self.writes = []

    def _write(self):
        self.writes.append(self.percent)
        self._artifact_id, self._pushed = "id", self.done


def test_stage_progress_only_for_stages_that_take_a_while():
    now = [0.0]
    quick = RecordedStage(lambda: now[0])
    for done in range(1, 5):
        now[0] += 1.0
        quick.update(done, 4)
    quick.close()
    assert quick.writes == []  # 4 s: no artifact at all

    now = [0.0]
    slow = RecordedStage(lambda: now[0])
    for done in range(1, 21):
        now[0] += 1.0
        slow.update(done, 20)
    slow.close()
    assert slow.writes[0] == 25.0  # first write once 5 s have passed (5 of 20 done)
    assert slow.writes[-1] == 100.0 and len(slow.writes) <= 5
