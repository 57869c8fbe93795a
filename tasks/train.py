"""Launch the training ranks as processes and supervise them.

The flow calls `run_training`; it writes a job file, starts `torchrun` (one process per rank,
running `tasks.train_worker`), streams rank 0's output to the caller's logger, and keeps every
rank's full log under `<train_dir>/logs/`. If a rank fails, the whole process group is ended and
`TrainingFailed` names the rank, its exit code and the tail of its log. The training folder is
keyed by content (tokenized data, base model, train settings), so running the same config again
after a crash resumes from the latest complete checkpoint, and a finished training is reused.

No rank outlives the run that launched it: torchrun gets SIGTERM when its launcher dies, even by
SIGKILL (Linux parent-death signal), and stops its ranks; the folder's lock stays held by torchrun
until it has exited, so the next run never meets ranks still writing; and any rank still alive
after torchrun ended is killed.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import psutil

from ftflow.config import TrainConfig, project_path
from ftflow.utils import PROJECT_ROOT, sha256_json
from tasks.train_worker import COMPLETE_MARKER, Job, is_complete_checkpoint, latest_complete_checkpoint

log = logging.getLogger("ftflow.train")

TRAIN_CODE_VERSION = "2"  # 2: LoRA finals carry adapter_config.json, Q-LoRA reference = un-quantised base


class TrainingFailed(RuntimeError):
    """`error` is what the rank died of (`rank_error`); `log_tail` the end of its log files."""

    def __init__(self, message: str, rank: int | None, exit_code: int | None, log_tail: str, error: str = ""):
        super().__init__(message)
        self.rank, self.exit_code, self.log_tail, self.error = rank, exit_code, log_tail, error

    def __reduce__(self):  # Prefect persists and re-raises failures: keep every field through pickling
        return (TrainingFailed, (self.args[0], self.rank, self.exit_code, self.log_tail, self.error))


def train_key(train: TrainConfig, dataset_key: str, model_fingerprint: str, template_text: str | None) -> str:
    """Everything that changes the trained weights. Launch-only settings (timeout, node rank,
    rendezvous address, logging cadence) are left out so a resumed run finds its checkpoints."""
    settings = train.model_dump(exclude={"timeout_minutes", "node_rank", "master_addr", "master_port", "logging_steps"})
    return sha256_json(
        {"train": settings, "data": dataset_key, "model": model_fingerprint, "template": template_text, "v": TRAIN_CODE_VERSION}
    )[:16]


def load_deepspeed_config(name: str | None) -> dict[str, Any] | None:
    if not name:
        return None
    path = project_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: {path} does not exist; pick one of configs/deepspeed/*.json or null")
    return json.loads(path.read_text())


def clean_partial_checkpoints(ckpt_root: Path) -> list[Path]:
    """Remove checkpoint folders without the completion marker (a save that was interrupted)."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.glob("checkpoint-*"):
            if p.is_dir() and not is_complete_checkpoint(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def torchrun_command(job_path: Path, train: TrainConfig, log_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.nproc_per_node}"]
    if train.nnodes == 1 and train.master_port == 0:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={train.nnodes}",
            f"--node-rank={train.node_rank}",
            f"--master-addr={train.master_addr}",
            f"--master-port={train.master_port}",
        ]
    # Every rank's output goes to files under log_dir; only local rank 0 is echoed to us.
    cmd += [f"--log-dir={log_dir}", "--tee=3", "--local-ranks-filter=0", "--module", "tasks.train_worker", str(job_path)]
    return cmd


def _rank_log_tail(log_dir: Path, rank: int | None, lines: int = 40) -> str:
    files = sorted(log_dir.rglob("stderr.log")) + sorted(log_dir.rglob("stdout.log"))
    if rank is not None:
        files = [f for f in files if f.parent.name == str(rank)] or files
    chunks = []
    for f in files:
        text = f.read_text(errors="replace").strip().splitlines()
        if text:
            chunks.append(f"--- {f.relative_to(log_dir)} ---\n" + "\n".join(text[-lines:]))
    return "\n".join(chunks)[-6000:]


_FRAME = re.compile(r'^\s*File "')
# Lines that are log output, not the continuation of an exception's message.
_LOG_LINE = re.compile(r"^(\[|[WIEF]\d{4} |\d{4}-\d\d-\d\d|\S*Warning\b|(WARNING|INFO|DEBUG|ERROR)\b|\s*warnings\.warn)")


def rank_error(text: str, max_lines: int = 12) -> str:
    """What a rank died of, from its log: the last traceback's innermost frame and its exception
    line(s); else the last line naming an error. Warnings logged before or after it are left out.
    '' when the log names no error (a rank killed by a signal writes none)."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("Traceback (most recent call last):")]
    if starts:
        block = lines[starts[-1]:]
        frames = [i for i, ln in enumerate(block) if _FRAME.match(ln)]
        if frames:
            rest = block[frames[-1]:]
            out = rest[:2]  # File "...", line N, in f  +  its source line
            for ln in rest[2:]:
                if len(out) > 2 and (not ln.strip() or _LOG_LINE.match(ln)):
                    break  # the exception ended; what follows is other output (a warning, a log line)
                if len(out) == 2 and (not ln.strip() or set(ln.strip()) <= set("^~ ")):
                    continue  # the caret line under the source line
                out.append(ln)
                if len(out) >= max_lines:
                    break
            return "\n".join(out)
    named = [ln for ln in lines if re.match(r"^\s*[A-Za-z_][\w.]*(Error|Exception)\b:?", ln) and "Warning" not in ln]
    return named[-1].strip() if named else ""


def describe_exit(code: int | None) -> str:
    """'exit code 1', or for a signal 'signal 9 (SIGKILL: killed, e.g. by the out-of-memory killer)'."""
    if code is None:
        return "an unknown exit code"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGKILL": ": killed, e.g. by the out-of-memory killer or a user",
                "SIGSEGV": ": a crash in native code"}.get(name, "")
        return f"signal {-code} ({name}{hint})"
    return f"exit code {code}"


def _rank_error_of(log_dir: Path, rank: int | None) -> str:
    """`rank_error` of the failed rank's own stderr (every rank's when the rank is unknown)."""
    files = sorted(log_dir.rglob("stderr.log"))
    if rank is not None:
        files = [f for f in files if f.parent.name == str(rank)] or files
    for f in files:
        error = rank_error(f.read_text(errors="replace"))
        if error:
            return error
    return ""


def _failed_rank(output: str) -> tuple[int | None, int | None]:
    """torchrun's failure summary: the 'Root Cause' entry's 'rank : 1 (local_rank: 1)' and
    'exitcode : -9'; the 'Failures' entries above it are the ranks torchrun stopped afterwards."""
    if "Root Cause" in output:
        output = output[output.rindex("Root Cause"):]
    m_rank = re.search(r"rank\s*:\s*(\d+)\s*\(local_rank", output)
    m_code = re.search(r"exitcode\s*:\s*(-?\d+)", output)
    return (int(m_rank.group(1)) if m_rank else None, int(m_code.group(1)) if m_code else None)


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_survivors(procs: list[psutil.Process]) -> None:
    """SIGKILL the ranks still alive after torchrun ended (torchrun starts each in its own session,
    so they are not in its process group and would outlive it as orphans)."""
    alive = [p for p in procs if p.is_running()]  # is_running also checks the start time: no pid reuse
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End torchrun and every rank it started: SIGTERM lets torchrun stop its ranks itself;
    whatever is left after `grace_s` (torchrun or a rank) is killed."""
    ranks = _descendants(proc)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    _kill_survivors(ranks)


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _sigterm_when_parent_dies(parent: int) -> Callable[[], None] | None:
    """A preexec_fn: the child (torchrun) gets SIGTERM when the thread that launched it dies, by
    SIGKILL too, and then stops its ranks. Linux only (elsewhere an orphaned torchrun runs on)."""
    if _LIBC is None:
        return None
    prctl = _LIBC.prctl  # looked up here, not in the forked child

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def launch(
    job_path: Path,
    train: TrainConfig,
    log_dir: Path,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    keep_fds: tuple[int, ...] = (),
) -> None:
    """Run torchrun to the end. `keep_fds` stay open in torchrun (the training folder's lock, so it
    is held until torchrun and its ranks are gone, whatever happens to this process)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(job_path, train, log_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // train.nproc_per_node)))
    env["PYTHONUNBUFFERED"] = "1"
    log.info("launching %d rank(s): %s", train.nproc_per_node * train.nnodes, " ".join(cmd))
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", start_new_session=True,
        pass_fds=keep_fds, preexec_fn=_sigterm_when_parent_dies(os.getpid()),
    )
    if on_start:
        on_start(proc)  # e.g. a test that kills one rank mid-run
    tail: deque[str] = deque(maxlen=400)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_line:
                on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + train.timeout_minutes * 60
    ranks: dict[int, psutil.Process] = {}  # every process torchrun started, to be sure none survives it
    try:
        while proc.poll() is None:
            ranks.update((p.pid, p) for p in _descendants(proc))
            if time.monotonic() > deadline:
                kill_group(proc)
                raise TrainingFailed(
                    f"training exceeded train.timeout_minutes={train.timeout_minutes}; every rank was stopped. "
                    f"Logs: {log_dir}", None, None, _rank_log_tail(log_dir, None),
                )
            time.sleep(0.5)
    except BaseException:
        kill_group(proc)
        raise
    finally:
        _kill_survivors(list(ranks.values()))
        reader.join(timeout=5)
    if proc.returncode != 0:
        output = "\n".join(tail)
        rank, code = _failed_rank(output)
        kill_group(proc)
        code = code if code is not None else proc.returncode
        rank_tail = _rank_log_tail(log_dir, rank)
        error = _rank_error_of(log_dir, rank)  # the rank's own log: torchrun's output has torchrun's traceback
        raise TrainingFailed(
            f"training failed: rank {rank if rank is not None else '?'} exited with code {code}"
            + (f" ({describe_exit(code)})" if code is not None and code < 0 else "") + ". "
            f"All ranks were stopped; the next run resumes from the latest complete checkpoint. "
            f"Full logs: {log_dir}\n" + (f"error:\n{error}\n" if error else "") + f"log tail:\n{rank_tail or output[-4000:]}",
            rank, code, rank_tail, error,
        )


def run_training(
    *,
    train: TrainConfig,
    train_dir: Path,
    model_path: str,
    dataset_path: str,
    pad_token_id: int,
    trust_remote_code: bool = False,
    revision: str | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    reference_inputs: list[list[int]] | None = None,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or reuse a finished training) in `train_dir`. Returns the train summary.

    The folder is keyed by content, so two runs of the same config meet here: a lock makes the
    second wait until the first has finished, after which it finds `final/` complete and reuses it.
    """
    with exclusive(train_dir.parent / f".{train_dir.name}.lock", "another run is training the same thing") as lock:
        return _run_training_locked(
            train=train, train_dir=train_dir, model_path=model_path, dataset_path=dataset_path,
            pad_token_id=pad_token_id, trust_remote_code=trust_remote_code, revision=revision,
            mlflow_tracking_uri=mlflow_tracking_uri, mlflow_run_id=mlflow_run_id,
            reference_inputs=reference_inputs, on_line=on_line, on_start=on_start, lock_fd=lock.fileno(),
        )


@contextmanager
def exclusive(lock_path: Path, waiting_for: str = "another run holds it") -> Iterator[IO[str]]:
    """An advisory lock (flock) held for the block; released by the OS when every process holding
    the open file (this one, and a child it was passed to) has died. Yields the open lock file."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s (%s); waiting for it to finish", waiting_for, lock_path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_exclusive = exclusive  # the name tests/unit/test_train_launcher.py uses


def _run_training_locked(
    *,
    train: TrainConfig,
    train_dir: Path,
    model_path: str,
    dataset_path: str,
    pad_token_id: int,
    trust_remote_code: bool,
    revision: str | None,
    mlflow_tracking_uri: str | None,
    mlflow_run_id: str | None,
    reference_inputs: list[list[int]] | None,
    on_line: Callable[[str], None] | None,
    on_start: Callable[[subprocess.Popen], None] | None,
    lock_fd: int,
) -> dict[str, Any]:
    final = train_dir / "final"
    if is_complete_checkpoint(final):
        log.info("training in %s already complete: reusing it", train_dir)
        summary = json.loads((final / "train_summary.json").read_text())
        return {**summary, "reused": True, "resumed_from": None, "final_dir": str(final)}
    if final.exists():
        shutil.rmtree(final)  # an interrupted final save: never used
    ckpt_root = train_dir / "checkpoints"
    for p in clean_partial_checkpoints(ckpt_root):
        log.warning("removed incomplete checkpoint %s", p)
    resume = latest_complete_checkpoint(ckpt_root)
    job = Job(
        model_path=model_path,
        dataset_path=dataset_path,
        output_dir=str(train_dir),
        pad_token_id=pad_token_id,
        train=train.model_dump(),
        deepspeed_config=load_deepspeed_config(train.deepspeed),
        resume_from=str(resume) if resume else None,
        trust_remote_code=trust_remote_code,
        revision=revision,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_run_id=mlflow_run_id,
        reference_inputs=reference_inputs,
    )
    train_dir.mkdir(parents=True, exist_ok=True)
    job_path = train_dir / "job.json"
    job_path.write_text(json.dumps(asdict(job), indent=2))
    launch(job_path, train, train_dir / "logs" / time.strftime("%Y%m%d-%H%M%S"), on_line=on_line, on_start=on_start,
           keep_fds=(lock_fd,))
    if not is_complete_checkpoint(final):
        raise TrainingFailed(f"training exited cleanly but {final} has no {COMPLETE_MARKER}", None, 0, "")
    summary = json.loads((final / "train_summary.json").read_text())
    return {**summary, "reused": False, "resumed_from": str(resume) if resume else None, "final_dir": str(final)}
