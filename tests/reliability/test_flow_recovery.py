"""Faults while the whole `finetune` flow runs: `ftflow run` in its own process (Prefect ephemeral,
2 DeepSpeed ZeRO-3 ranks on CPU, MLflow SQLite), on a tiny config (64 samples, 6 steps).

- a rank SIGKILLed between two checkpoints: the flow run fails naming the rank, its exit code and a
  log tail; no torchrun or rank process is left; the next run resumes from the last complete
  checkpoint and ends with the weights of an uninterrupted run (max |diff| <= 1e-6);
- the flow process SIGKILLed while the ranks are writing a checkpoint: the ranks stop, the partial
  checkpoint is never used (removed, the next run resumes from the one before), the next run
  completes with the uninterrupted run's weights;
- two runs of the same config started together: both succeed with their own outputs, the
  tokenized cache and the training are built once and reused, and the registry holds exactly one
  version for the fingerprint, which both runs report.

The uninterrupted reference run (`straight`) has its own FTFLOW_HOME; every test gets a fresh one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.train_worker import COMPLETE_MARKER

from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# 6 optimizer steps (64 samples, 4 per rank x 2 ranks = 8 a step), checkpoints after steps 2, 4, 6.
STEPS, SAVE_EVERY, KILL_AFTER = 6, 2, 3
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)  # in /proc/PID/status ShdPnd / SigPnd


# --------------------------------------------------------------------------- helpers


class FlowRun:
    """`ftflow run CONFIG` in a new session; its output goes to a file (a pipe could be held open
    by a process that outlives it)."""

    def __init__(self, home: Path, config: Path, tag: str):
        self.home, self.tag = home, tag
        self.summary_path = home / f"summary-{tag}.json"
        self.log_path = home / f"flow-{tag}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
        env["FTFLOW_HOME"] = str(home)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ftflow.cli", "run", str(config), "--summary-json", str(self.summary_path)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout=timeout)

    def summary(self) -> dict:
        assert self.proc.wait(timeout=900) == 0, f"flow run {self.tag} failed:\n{self.output()[-8000:]}"
        return json.loads(self.summary_path.read_text())


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _training_procs(home: Path) -> list[psutil.Process]:
    """Live torchrun and rank processes of trainings under `home` (their command lines name its job file)."""
    found = []
    for p in psutil.process_iter():
        cmd = _cmdline(p)
        if str(home) in cmd and ("torch.distributed.run" in cmd or "tasks.train_worker" in cmd) and _alive(p):
            found.append(p)
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ranks(home: Path) -> dict[int, psutil.Process]:
    out = {}
    for p in _training_procs(home):
        if "tasks.train_worker" in _cmdline(p):
            try:
                out[int(p.environ()["RANK"])] = p
            except (psutil.Error, KeyError):
                pass
    return out


def _sigterm_pending_or_gone(p: psutil.Process) -> bool:
    try:
        status = Path(f"/proc/{p.pid}/status").read_text()
    except OSError:
        return True
    if not p.is_running() or "State:\tZ" in status:
        return True
    pending = [int(v, 16) for k, v in re.findall(r"^(ShdPnd|SigPnd):\s*([0-9a-f]+)$", status, re.M)]
    return any(v & SIGTERM_BIT for v in pending)


def _kill_everything_of(home: Path, *runs: FlowRun) -> None:
    """Test clean-up: each flow's session (with Prefect's temporary server, which a SIGKILLed flow
    leaves behind) and any training process under `home`."""
    for run in runs:
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.proc.wait(timeout=30)
    procs = _training_procs(home)
    for p in psutil.process_iter():
        try:
            if p.environ().get("FTFLOW_HOME") == str(home):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.resume()
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def _train_dir(home: Path) -> Path:
    dirs = [d for d in (home / "train").iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _max_weight_diff(final_a: Path, final_b: Path) -> float:
    from tasks.consolidate import materialise, trained_state_dict

    a = materialise(trained_state_dict(final_a))
    b = materialise(trained_state_dict(final_b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _final_dir(summary: dict) -> Path:
    return Path(summary["model_dir"]).parent / "final"  # <train dir>/export -> <train dir>/final


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny config: 64 training samples, 6 steps with checkpoints every 2, 4 held-out samples."""
    root = tmp_path_factory.mktemp("flow-recovery-config")
    (root / "train.jsonl").write_text("\n".join((REPO / "data/demo/reverse_train.jsonl").read_text().splitlines()[:64]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((REPO / "data/demo/reverse_eval.jsonl").read_text().splitlines()[:4]) + "\n")
    cfg = {
        "name": "recovery",
        "model": {"name_or_path": str(tiny_model_dir)},  # the session's embedded model: built once
        "data": {"train": [str(root / "train.jsonl")], "eval": [str(root / "eval.jsonl")]},
        "tokenize": {"max_length": 64},
        "train": {
            "mode": "full", "deepspeed": "configs/deepspeed/zero3.json", "nproc_per_node": 2,
            "max_steps": STEPS, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.2,
            "lr_scheduler": "cosine", "save_steps": SAVE_EVERY, "save_total_limit": 3, "logging_steps": 1,
            "seed": 3, "group_by_length": False, "timeout_minutes": 10,
        },
        "eval": {"batch_size": 4, "max_samples": 4, "generation": {"max_new_tokens": 8}},
        "registry": {"model_name": "ftflow-recovery"},
    }
    path = root / "recovery.yaml"
    path.write_text("# ftflow run " + str(path) + "\n" + yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, config) -> dict:
    """The same config run once without faults, in its own FTFLOW_HOME."""
    home = tmp_path_factory.mktemp("straight-home")
    run = FlowRun(home, config, "straight")
    try:
        s = run.summary()
    finally:
        _kill_everything_of(home, run)
    assert s["training"]["resumed_from"] is None and s["training"]["global_step"] == STEPS
    return s


# --------------------------------------------------------------------------- tests


def test_rank_sigkilled_in_flow_fails_clearly_then_next_run_resumes(tmp_path_factory, config, straight):
    home = tmp_path_factory.mktemp("rank-kill-home")
    crashed = FlowRun(home, config, "crashed")
    resumed = None
    try:
        # rank 0's step lines reach the flow log; kill rank 1 once step 3 is logged (checkpoint 2
        # is complete, checkpoint 4 not yet begun)
        assert wait_for(lambda: f"step {KILL_AFTER}/{STEPS}" in crashed.output() or crashed.proc.poll() is not None, 600), \
            crashed.output()[-4000:]
        ranks = _ranks(home)
        assert set(ranks) == {0, 1}, f"ranks found: {ranks}\n{crashed.output()[-4000:]}"
        launched = _training_procs(home)  # torchrun + both ranks
        ranks[1].send_signal(signal.SIGKILL)
        rc = crashed.wait(600)
        out = crashed.output()

        assert rc != 0, out[-4000:]
        # one message: the rank, its exit code (a signal, said in words), where its logs are, the exit code
        assert rc == 1, out[-4000:]
        m = re.search(r"^error: training failed: rank 1 exited with code -9 \(signal 9 \(SIGKILL.*?^  rank logs: (\S+)$",
                      out, re.S | re.M)
        assert m, out[-6000:]
        assert Path(m.group(1)).is_dir() and str(home) in m.group(1)
        assert "ftflow run failed in stage 'train' (exit code 1)" in out, out[-3000:]
        # the full log (in the run's output folder) holds the traceback and the rank's log tail
        full = re.search(r"full log \(every traceback\): (\S+)", out)
        assert full and Path(full.group(1)).parent.parent == home / "runs" / "recovery", out[-3000:]
        log_text = Path(full.group(1)).read_text()
        assert "Traceback" in log_text
        assert re.search(r"--- \S*/1/std(err|out)\.log ---|Root Cause", log_text), log_text[-3000:]
        # no torchrun and no rank is left running
        assert wait_for(lambda: not any(_alive(p) for p in launched), 30), launched
        assert _training_procs(home) == []
        # the run is recorded as failed
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("ftflow").experiment_id])
        assert {r.info.run_name: r.info.status for r in runs if r.info.run_name == "train"} == {"train": "FAILED"}
        assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FAILED"]

        ckpts = _train_dir(home) / "checkpoints"
        assert (ckpts / f"checkpoint-{SAVE_EVERY}" / COMPLETE_MARKER).is_file()
        assert not (ckpts / f"checkpoint-{2 * SAVE_EVERY}" / COMPLETE_MARKER).exists()

        resumed = FlowRun(home, config, "resumed")
        s = resumed.summary()
    finally:
        _kill_everything_of(home, crashed, *([resumed] if resumed else []))
    assert s["training"]["resumed_from"] == str(ckpts / f"checkpoint-{SAVE_EVERY}")
    assert s["training"]["global_step"] == STEPS and s["training"]["reused"] is False
    assert s["version"] == "1"
    diff = _max_weight_diff(_final_dir(s), _final_dir(straight))
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff:.3e}"


def test_flow_sigkilled_during_checkpoint_save_never_uses_the_partial_checkpoint(tmp_path_factory, config, straight):
    home = tmp_path_factory.mktemp("flow-kill-home")
    killed = FlowRun(home, config, "killed")
    after = None
    target = f"checkpoint-{2 * SAVE_EVERY}"
    try:
        # Find both ranks once they are training (a process scan is too slow to do inside the save).
        assert wait_for(lambda: "step 1/" in killed.output() or killed.proc.poll() is not None, 600), killed.output()[-4000:]
        ranks = _ranks(home)
        assert set(ranks) == {0, 1}, f"ranks found: {ranks}\n{killed.output()[-4000:]}"
        ckpt = _train_dir(home) / "checkpoints" / target
        # checkpoint-4 while it is being written: the folder is there, its completion marker not yet
        assert wait_for(lambda: ckpt.is_dir() or killed.proc.poll() is not None, 600, step=0.002), killed.output()[-4000:]
        # Freeze both ranks where they are, so the flow dies while the save is in progress whatever
        # the timing; they resume once the stop signal has reached them.
        for p in ranks.values():
            p.suspend()
        assert not (ckpt / COMPLETE_MARKER).exists(), "the kill did not land during the save"
        os.kill(killed.proc.pid, signal.SIGKILL)
        killed.proc.wait(timeout=30)

        # The ranks are told to stop (torchrun gets SIGTERM when the flow dies and passes it on) ...
        told = wait_for(lambda: all(_sigterm_pending_or_gone(p) for p in ranks.values()), 60)
        for p in ranks.values():
            try:
                p.resume()
            except psutil.Error:
                pass
        assert told, "the training ranks were not stopped when the flow process died"
        # ... and nothing of the training outlives the flow
        assert wait_for(lambda: _training_procs(home) == [], 60), _training_procs(home)
        assert not (ckpt / COMPLETE_MARKER).exists(), "the interrupted save was completed after all"
        assert not (ckpt.parent.parent / "final" / COMPLETE_MARKER).exists()
        ckpts = ckpt.parent
        assert (ckpts / f"checkpoint-{SAVE_EVERY}" / COMPLETE_MARKER).is_file()

        # The next run (the killed flow's temporary Prefect server still running beside it) completes.
        after = FlowRun(home, config, "after-kill")
        # a slot the killed run held would keep it waiting here for ever
        assert wait_for(lambda: "'gpu' slot acquired" in after.output() or after.proc.poll() is not None, 300), \
            after.output()[-4000:]
        s = after.summary()
        out = after.output()
    finally:
        _kill_everything_of(home, killed, *([after] if after else []))
    assert f"removed incomplete checkpoint {ckpt}" in out
    assert s["training"]["resumed_from"] == str(ckpts / f"checkpoint-{SAVE_EVERY}")
    assert s["training"]["global_step"] == STEPS
    assert (ckpt / COMPLETE_MARKER).is_file()  # written again, completely, by the resumed run
    diff = _max_weight_diff(_final_dir(s), _final_dir(straight))
    assert diff <= 1e-6, f"weights after the kill differ from the uninterrupted run's by {diff:.3e}"


def test_two_runs_of_the_same_config_at_once(tmp_path_factory, config):
    home = tmp_path_factory.mktemp("concurrent-home")
    runs = [FlowRun(home, config, "a"), FlowRun(home, config, "b")]
    try:
        a, b = (r.summary() for r in runs)
    finally:
        _kill_everything_of(home, *runs)
    # each run has its own outputs, records and summary
    assert a["outputs"] != b["outputs"] and a["prefect_flow_run_id"] != b["prefect_flow_run_id"]
    assert a["mlflow_run_id"] != b["mlflow_run_id"]
    # the content-keyed tokenized cache and the training were built once, and reused by the other run
    assert sorted([a["tokenized_cache_hit"], b["tokenized_cache_hit"]]) == [False, True]
    cache = home / "cache" / "tokenized"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    assert sorted([a["training"]["reused"], b["training"]["reused"]]) == [False, True]
    train_dir = _train_dir(home)
    assert a["model_dir"] == b["model_dir"] == str(train_dir / "export")
    assert not [p for p in train_dir.iterdir() if p.name.startswith(".tmp-")]  # no export copy left over
    # one registered version, reported by both
    assert a["version"] == b["version"] == "1"
    assert sorted([a["already_registered"], b["already_registered"]]) == [False, True]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name='ftflow-recovery'")
    assert [(str(v.version), v.status) for v in versions] == [("1", "READY")]
    assert str(client.get_model_version_by_alias("ftflow-recovery", "challenger").version) == "1"
    assert _training_procs(home) == []


def test_concurrent_registrations_of_one_fingerprint_make_one_version(tmp_path, config, tiny_model_dir):
    """The `register` task in two processes released at the same instant: without a lock both
    look up the fingerprint, find nothing and create a version each."""
    home = tmp_path / "home"
    go = tmp_path / "go"
    script = tmp_path / "register.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path

        from infra.local import configure_environment, ensure_experiment

        configure_environment()
        import mlflow
        from prefect import flow

        from ftflow.config import load_config
        from tasks import stages

        cfg = load_config({str(config)!r})

        @flow
        def register_only():
            run_id = mlflow.MlflowClient().create_run(ensure_experiment("race")).info.run_id
            print("READY", flush=True)
            while not Path({str(go)!r}).exists():
                time.sleep(0.01)
            rv = stages.register(cfg, {str(tiny_model_dir)!r}, "fp-race", run_id, tags={{}})
            print("VERSION", rv.version, rv.existed, flush=True)

        register_only()
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(FTFLOW_HOME=str(home), PYTHONPATH=str(REPO))
    # the stores exist before the race (creating them is not what this test is about)
    subprocess.run([sys.executable, "-c", "from infra.local import ensure_experiment; ensure_experiment('race')"],
                   cwd=REPO, env=env, check=True, timeout=300)
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    try:
        lines: list[list[str]] = [[], []]
        for i, p in enumerate(procs):  # both are inside their flow, one step from registering
            for line in p.stdout:
                lines[i].append(line)
                if line.startswith("READY"):
                    break
            assert lines[i] and lines[i][-1].startswith("READY"), "".join(lines[i])[-4000:]
        go.touch()
        for i, p in enumerate(procs):
            lines[i] += p.stdout.readlines()
            assert p.wait(timeout=600) == 0, "".join(lines[i])[-4000:]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reported = [next(line.split()[1:] for line in out if line.startswith("VERSION")) for out in lines]
    assert sorted(reported) == [["1", "False"], ["1", "True"]], reported
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='ftflow-recovery'")] == ["1"]
