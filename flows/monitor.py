"""What a person watching Prefect and MLflow sees while a run runs, and what they can react to.

- Events (`emit_event`), with the registered model as the resource, for Prefect automations:
      ftflow.model.registered        resource ftflow.model.<name>.<version>
      ftflow.model.promoted          resource ftflow.model.<name>.<version>, payload: reason, scores
      ftflow.model.not-promoted      resource ftflow.model.<name>.<version>, payload: reason, scores
      ftflow.model.rolled-back       resource ftflow.model.<name>.<version> (the new champion)
      ftflow.data.rejected-over-limit   resource ftflow.model.<name> (no version exists yet)
      ftflow.training.failed         resource ftflow.model.<name>
  Every resource carries the labels `ftflow.model.name` (and `ftflow.model.version` when there is
  one); an event emitted inside a flow or task run is related to that run by Prefect itself.
- `TrainingProgress`: rank 0 logs one `FTFLOW_PROGRESS {json}` line per optimizer step (at most
  one a second) and one per logging step (`tasks.train_worker`); the launcher hands every rank-0
  line to `TrainingProgress.feed` inside the `train` task, which moves a progress artifact
  (`training-progress`) and writes a table artifact (`training-progress-table`: step / total,
  loss, learning rate, tokens/s, elapsed, ETA), each at most once every `interval_s` seconds.
- `StageProgress`: a progress artifact for scored inference (`evaluation-progress-LABEL`), only
  when the stage runs longer than a few seconds.
- `start_system_metrics(run_id)`: MLflow's own system-metrics logging (CPU, RAM, disk, network; GPU
  utilisation and memory through pynvml where there is a GPU) into the train run.

Nothing here may break a run: a failure to emit or update is logged as a warning, once.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
from typing import Any, Callable

log = logging.getLogger("ftflow.monitor")

PROGRESS_MARK = "FTFLOW_PROGRESS "  # what rank 0 puts in front of a progress line's JSON
PROGRESS_KEY = "training-progress"
TABLE_KEY = "training-progress-table"


# ---------------------------------------------------------------------------------------------- events


def model_resource(name: str, version: Any = None) -> dict[str, str]:
    """The Prefect resource of a registered model (a version of it, when `version` is given)."""
    if version is None:
        return {"prefect.resource.id": f"ftflow.model.{name}", "prefect.resource.name": name, "ftflow.model.name": name}
    return {"prefect.resource.id": f"ftflow.model.{name}.{version}", "prefect.resource.name": f"{name} v{version}",
            "ftflow.model.name": name, "ftflow.model.version": str(version)}


def emit(event: str, resource: dict[str, str], payload: dict[str, Any]) -> Any:
    """`emit_event`, never raising: an event lost is logged, a run is never failed by it."""
    try:
        from prefect.events import emit_event

        ev = emit_event(event=event, resource=resource, payload=json.loads(json.dumps(payload, default=str)))
        if ev is None:
            log.debug("event %s not sent (no Prefect events client here)", event)
        return ev
    except Exception as err:  # noqa: BLE001 — an event is never worth a run
        log.warning("could not emit Prefect event %s: %s", event, err)
        return None


def model_registered(name: str, version: Any, *, model_uri: str, existed: bool, run_id: str | None = None,
                     train_key: str | None = None) -> Any:
    return emit("ftflow.model.registered", model_resource(name, version),
                {"model_name": name, "version": str(version), "model_uri": model_uri, "already_registered": existed,
                 "mlflow_run_id": run_id, "train_key": train_key})


def promotion_decided(name: str, version: Any, decision: dict[str, Any], challenger: dict[str, Any],
                      champion: dict[str, Any]) -> Any:
    """`ftflow.model.promoted` or `ftflow.model.not-promoted`, with the reason and both models' scores."""
    scores = {"challenger": _numbers(challenger), "champion": _numbers(champion)}
    payload = {"model_name": name, "version": str(version), "reason": decision.get("reason"), "metric": decision.get("metric"),
               "challenger_score": decision.get("challenger_score"), "champion_score": decision.get("champion_score"),
               "delta": decision.get("delta"), "compared_with": decision.get("compared_with"), "scores": scores,
               "already_champion": bool(decision.get("already_champion"))}
    event = "ftflow.model.promoted" if decision.get("promote") else "ftflow.model.not-promoted"
    return emit(event, model_resource(name, version), payload)


def model_promoted_by_hand(name: str, result: dict[str, Any]) -> Any:
    """`ftflow.model.promoted` for a person's promotion (the `promote` flow): who, why and the scores."""
    return emit("ftflow.model.promoted", model_resource(name, result.get("version")),
                {"model_name": name, "version": str(result.get("version")), "reason": result.get("reason"),
                 "who": result.get("who"), "why": result.get("why"), "forced": result.get("forced"),
                 "previous_champion": result.get("previous_champion"),
                 "scores": {"challenger": _numbers(result.get("scores") or {}),
                            "champion": _numbers(result.get("previous_scores") or {})}})


def model_rolled_back(name: str, result: dict[str, Any]) -> Any:
    return emit("ftflow.model.rolled-back", model_resource(name, result.get("to")),
                {"model_name": name, "from": str(result.get("from")), "to": str(result.get("to")),
                 "who": result.get("who"), "why": result.get("why")})


def data_rejected_over_limit(name: str, report: dict[str, Any], max_reject_fraction: float, message: str) -> Any:
    return emit("ftflow.data.rejected-over-limit", model_resource(name),
                {"model_name": name, "rows_in": report.get("rows_in"), "rejected": report.get("rejected"),
                 "reject_fraction": report.get("reject_fraction"), "max_reject_fraction": max_reject_fraction,
                 "by_reason": report.get("by_reason"), "message": message[:2000]})


def training_failed(name: str, err: BaseException, *, train_dir: str, mlflow_run_id: str | None = None) -> Any:
    return emit("ftflow.training.failed", model_resource(name),
                {"model_name": name, "error": f"{type(err).__name__}: {err}"[:4000], "rank": getattr(err, "rank", None),
                 "exit_code": getattr(err, "exit_code", None), "train_dir": train_dir, "mlflow_run_id": mlflow_run_id})


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------- live progress


def parse_progress(line: str) -> dict[str, Any] | None:
    """The JSON of a rank-0 progress line (any prefix in front of the mark), or None."""
    i = line.find(PROGRESS_MARK)
    if i < 0:
        return None
    try:
        rec = json.loads(line[i + len(PROGRESS_MARK):])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("max_steps"), int) else None


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrainingProgress:
    """Prefect artifacts that follow rank 0's progress lines. Create it in the task (its run
    context is kept for the launcher's reader thread), `feed` it lines, `close()` it at the end.

    Writes happen in the launcher's reader thread. A slow Prefect server delays only that thread
    and torchrun's log-tailing thread behind it: the ranks write their output to files (torchrun
    --tee), so they never wait on it, and the launcher's timeout watch runs in its own thread."""

    def __init__(self, description: str, interval_s: float = 5.0, clock=time.monotonic):
        self.description, self.interval_s, self.clock = description, interval_s, clock
        self._ctx = contextvars.copy_context()  # the task run's Prefect context, for the reader thread
        self._lock = threading.Lock()
        self._artifact_id = None
        self._failed = False
        self.step = self.max_steps = self.start_step = 0
        self.started = clock()
        self.rows: list[dict[str, Any]] = []  # one per logging step, newest last
        self._pushed_step = -1
        self._pushed_rows = 0
        self._last_push = float("-inf")
        self.pushes = 0  # how many times the artifacts were written (the rate limit is tested on it)

    @property
    def percent(self) -> float:
        return round(100.0 * self.step / self.max_steps, 2) if self.max_steps else 0.0

    def feed(self, line: str) -> None:
        rec = parse_progress(line)
        if rec is None:
            return
        with self._lock:
            if rec.get("event") == "begin" or not self.max_steps:
                # A resumed run begins at the step of its checkpoint: speed and ETA count from there.
                self.start_step, self.started = rec["step"], self.clock()
            self.step, self.max_steps = rec["step"], rec["max_steps"]
            if "loss" in rec or "learning_rate" in rec:
                self.rows.append(self._row(rec))
            if self.clock() - self._last_push >= self.interval_s:
                self._push()

    def _row(self, rec: dict[str, Any]) -> dict[str, Any]:
        elapsed = self.clock() - self.started
        done = self.step - self.start_step
        eta = elapsed / done * (self.max_steps - self.step) if done > 0 else None
        return {"step": f"{self.step}/{self.max_steps}", "loss": _round(rec.get("loss")),
                "learning_rate": _round(rec.get("learning_rate"), 8), "tokens_per_s": _round(rec.get("tokens_per_s"), 1),
                "elapsed": _duration(elapsed), "eta": _duration(eta)}

    def reused(self, global_step: int) -> None:
        """A training found complete and reused: the bar shows it done, at its last step."""
        with self._lock:
            self.step = self.max_steps = self.start_step = int(global_step)
            self.description += " (reused: already trained)"

    def close(self) -> None:
        """Write what was not written yet (the run's last step: 100% when training completed)."""
        with self._lock:
            if self.max_steps and (self.step != self._pushed_step or len(self.rows) != self._pushed_rows):
                self._push()

    def _push(self) -> None:
        self._last_push = self.clock()
        if self._failed:
            return
        try:
            self._ctx.run(self._write)
        except Exception as err:  # noqa: BLE001 — progress is never worth a training run
            self._failed = True
            log.warning("could not update the training progress artifacts (no more tries this run): %s", err)

    def _write(self) -> None:
        from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

        text = f"{self.description}: step {self.step}/{self.max_steps}"
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(self.percent, key=PROGRESS_KEY, description=text)
        elif self.step != self._pushed_step:
            update_progress_artifact(self._artifact_id, self.percent, description=text)
        self._pushed_step = self.step
        if len(self.rows) != self._pushed_rows:
            create_table_artifact(self.rows[-20:], key=TABLE_KEY, description=f"{self.description} (last 20 logging steps)")
            self._pushed_rows = len(self.rows)
        self.pushes += 1


class StageProgress:
    """A progress artifact for a stage that may take a while (scored inference): nothing for a
    stage done within `after_s`, then updates at most every `interval_s`, and 100 % at the end.
    `update(done, total)` is a plain callback the stage module calls; `close()` after the stage."""

    def __init__(self, key: str, description: str, after_s: float = 5.0, interval_s: float = 5.0, clock=time.monotonic):
        self.key, self.description, self.after_s, self.interval_s, self.clock = key, description, after_s, interval_s, clock
        self.started = clock()
        self.done = self.total = 0
        self._artifact_id = None
        self._last_push = float("-inf")
        self._pushed = -1
        self._failed = False

    @property
    def percent(self) -> float:
        return round(100.0 * self.done / self.total, 2) if self.total else 0.0

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = self.clock()
        if now - self.started >= self.after_s and now - self._last_push >= self.interval_s:
            self._push()

    def close(self) -> None:
        if self._artifact_id is not None and self.done != self._pushed:
            self._push()

    def _push(self) -> None:
        self._last_push = self.clock()
        if self._failed:
            return
        try:
            self._write()
        except Exception as err:  # noqa: BLE001 — progress is never worth a run
            self._failed = True
            log.warning("could not update the %s progress artifact: %s", self.key, err)

    def _write(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        text = f"{self.description}: {self.done}/{self.total}"
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(self.percent, key=self.key, description=text)
        else:
            update_progress_artifact(self._artifact_id, self.percent, description=text)
        self._pushed = self.done


def _round(v: Any, digits: int = 5) -> Any:
    return round(float(v), digits) if isinstance(v, (int, float)) else None


# ------------------------------------------------------------------------------------ system metrics


def start_system_metrics(run_id: str | None, tracking_uri: str | None = None,
                         sampling_interval_s: float | None = None) -> Callable[[], None]:
    """Start MLflow's system metrics (`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
    disk, network, `system/gpu_*` with pynvml) logged into `run_id`; returns the function that stops them.

    The machine is sampled from the launcher's process: these are the node's figures, the ranks
    included. `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` (seconds, default 10) sets the cadence."""
    if not run_id:
        return lambda: None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = sampling_interval_s or float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10))
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri, resume_logging=True)
        monitor.start()
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow system metrics are off for this run: %s", err)
        return lambda: None

    def stop() -> None:
        try:
            monitor.finish()
        except Exception as err:  # noqa: BLE001
            log.warning("could not finish MLflow system metrics: %s", err)

    return stop
