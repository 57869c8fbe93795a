"""No training process outlives its launcher, checked quickly with a stand-in for torchrun.

- the launcher is SIGKILLed: torchrun gets SIGTERM (parent-death signal) and the training folder's
  lock stays held until torchrun has exited;
- torchrun ends but leaves a rank running (ranks live in their own sessions): the launcher kills it.

tests/reliability/test_flow_recovery.py checks the same through the whole flow with real ranks.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ftflow.config import TrainConfig

from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def _wait_for(pred, timeout: float = 30.0) -> bool:
    return wait_for(pred, timeout, step=0.02)


def _lock_is_free(path: Path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_launcher_killed_torchrun_is_told_to_stop_and_keeps_the_folder_locked(tmp_path):
    events = tmp_path / "events"
    fake_torchrun = tmp_path / "fake_torchrun.py"
    fake_torchrun.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        def on_term(*_):  # torchrun stops its ranks; that takes a moment
            open({str(events)!r}, "a").write("TERM\\n")
            time.sleep(3)
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        open({str(events)!r}, "a").write(f"START {{os.getpid()}}\\n")
        time.sleep(120)
    """))
    lock = tmp_path / ".train-x.lock"
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import tasks.train as tt
        from ftflow.config import TrainConfig
        tt.torchrun_command = lambda job, train, log_dir: [sys.executable, {str(fake_torchrun)!r}]
        with tt.exclusive(Path({str(lock)!r})) as f:
            tt.launch(Path("job.json"), TrainConfig(nproc_per_node=1, timeout_minutes=5), Path({str(tmp_path / "logs")!r}),
                      keep_fds=(f.fileno(),))
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(launcher)], cwd=REPO, env=env)
    fake_pid = None
    try:
        assert _wait_for(lambda: events.exists() and "START" in events.read_text(), 60), "the stand-in never started"
        fake_pid = int(events.read_text().split()[1])
        assert not _lock_is_free(lock)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert _wait_for(lambda: "TERM" in events.read_text(), 10), "torchrun was not told to stop when its launcher died"
        assert not _lock_is_free(lock), "the folder's lock was released while torchrun was still stopping its ranks"
        assert _wait_for(lambda: not psutil.pid_exists(fake_pid) or psutil.Process(fake_pid).status() == psutil.STATUS_ZOMBIE, 30)
        assert _wait_for(lambda: _lock_is_free(lock), 10)
    finally:
        proc.kill()
        if fake_pid and psutil.pid_exists(fake_pid):
            os.kill(fake_pid, signal.SIGKILL)


def test_a_rank_left_running_by_torchrun_is_killed(tmp_path, monkeypatch):
    import tasks.train as tt

    pid_file = tmp_path / "rank.pid"
    fake_torchrun = tmp_path / "fake_torchrun.py"
    # a rank in its own session (as torchrun starts them) that ignores SIGTERM, and a torchrun that
    # fails without stopping it
    fake_torchrun.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
                                start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(rank.pid))
        time.sleep(1.5)
        sys.exit(1)
    """))
    monkeypatch.setattr(tt, "torchrun_command", lambda job, train, log_dir: [sys.executable, str(fake_torchrun)])
    rank = None
    try:
        with pytest.raises(tt.TrainingFailed):
            tt.launch(tmp_path / "job.json", TrainConfig(nproc_per_node=1, timeout_minutes=2), tmp_path / "logs")
        rank = int(pid_file.read_text())
        assert _wait_for(lambda: not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE, 10), \
            "a rank outlived its torchrun"
    finally:
        if rank and psutil.pid_exists(rank):
            os.kill(rank, signal.SIGKILL)
