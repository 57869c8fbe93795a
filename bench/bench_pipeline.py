"""Orchestration overhead of `ftflow run`: flow wall time minus the stages' own compute
(a benchmark, not a test).

    python -m bench.bench_pipeline                 # the demo config as `make demo` runs it
    python -m bench.bench_pipeline --quick         # the demo with train.epochs=1

Runs the real CLI (`python -m ftflow.cli run configs/demo.yaml`) in a fresh process with its own
`FTFLOW_HOME` (a cold state folder: the embedded model is copied in, nothing else is cached), then
reads back what Prefect recorded for every task run of that flow run.

- wall: the CLI process from start to exit (imports, config, Prefect, MLflow, every stage);
- flow: the flow's own wall time as the CLI measures it (`wall_time_s` of the summary);
- stages: the sum of the task runs' durations (start to end, as Prefect stores them). What a task
  does is the stage's own compute: converting, tokenizing, launching DeepSpeed ranks, scoring;
- overhead = flow - stages: Prefect's engine, state transitions, result persistence, MLflow
  bookkeeping between stages. `process_overhead` (wall - stages) also counts interpreter start
  and imports. Goal: overhead <= 10% of the wall time.
Results go to bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "pipeline.json"


def _seconds(start: str | None, end: str | None) -> float:
    if not start or not end:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00").replace(" ", "T"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def task_runs(prefect_db: Path, flow_run_id: str) -> list[dict]:
    """(name, seconds) of every task run of one flow run, from Prefect's own SQLite database."""
    con = sqlite3.connect(prefect_db)
    try:
        rows = con.execute(
            "SELECT name, start_time, end_time FROM task_run WHERE flow_run_id = ? ORDER BY start_time",
            (flow_run_id.replace("-", ""),),
        ).fetchall()
        if not rows:  # UUIDs are stored with or without dashes depending on the Prefect version
            rows = con.execute(
                "SELECT name, start_time, end_time FROM task_run WHERE flow_run_id = ? ORDER BY start_time",
                (flow_run_id,),
            ).fetchall()
    finally:
        con.close()
    return [{"name": n, "seconds": round(_seconds(s, e), 3)} for n, s, e in rows]


def run_once(overrides: list[str], home: Path) -> dict:
    """One `ftflow run` in a fresh process and state folder; the measurements of it."""
    models = ROOT / ".ftflow" / "models"
    if models.is_dir():  # the embedded model build is setup, not the pipeline
        shutil.copytree(models, home / "models")
    summary_path = home / "summary.json"
    cmd = [sys.executable, "-m", "ftflow.cli", "run", str(ROOT / "configs" / "demo.yaml"),
           "--summary-json", str(summary_path)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "FTFLOW_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)  # ephemeral local Prefect: its database is ours to read
    # Prefect's default 20 s to start its ephemeral server is too short on a loaded 2-core machine.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ftflow run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    tasks = task_runs(home / "prefect" / "prefect.db", str(summary["prefect_flow_run_id"]))
    stages = sum(t["seconds"] for t in tasks)
    flow = float(summary["wall_time_s"])
    train_runtime = (summary.get("training") or {}).get("train_runtime_s") or 0.0
    return {
        "wall_s": round(wall, 2),
        "flow_s": flow,
        "stages_s": round(stages, 2),
        "overhead_s": round(flow - stages, 2),
        "overhead_share_of_wall": round((flow - stages) / wall, 4),
        "process_overhead_s": round(wall - stages, 2),
        "process_overhead_share": round((wall - stages) / wall, 4),
        "train_loop_s": train_runtime,
        "tasks": tasks,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="train.epochs=1 (a shorter flow, same stages)")
    ap.add_argument("--repeats", type=int, default=1, help="flow runs (median is reported)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    overrides = (["train.epochs=1"] if args.quick else []) + args.set

    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="ftflow-bench-pipe-") as tmp:
            runs.append(run_once(overrides, Path(tmp)))
    runs.sort(key=lambda r: r["overhead_share_of_wall"])
    med = runs[len(runs) // 2]
    result = {
        "command": "python -m bench.bench_pipeline" + (" --quick" if args.quick else ""),
        "overrides": overrides,
        "repeats": args.repeats,
        "median": med,
        "runs": runs,
        "goals_met": {"overhead <= 10% of wall": med["overhead_share_of_wall"] <= 0.10},
        "load_average": os.getloadavg(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"ftflow run configs/demo.yaml {' '.join('--set ' + o for o in overrides)}".rstrip(),
             f"  process wall {med['wall_s']:.1f}s, flow {med['flow_s']:.1f}s, stages (Prefect task runs) {med['stages_s']:.1f}s",
             f"  orchestration overhead {med['overhead_s']:.1f}s = {100 * med['overhead_share_of_wall']:.1f}% of wall "
             f"(goal <= 10%); with interpreter start and imports {100 * med['process_overhead_share']:.1f}%",
             *(f"    {t['name']:<28}{t['seconds']:>8.1f}s" for t in med["tasks"]),
             f"written to {args.out}"]
    print("\n".join(lines))  # the benchmark's report is its output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
