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

With `train.launcher: ray` the same supervision runs the Ray driver (`tasks.train_ray`) instead of
torchrun: the ranks run on a Ray cluster, rank 0's log is streamed the same way, and a failed worker
is reported the same way (rank, node, pid, log tail). torchrun across several nodes is refused: one
flow per node would deadlock on the `gpu` slot and this folder's lock (README, "Several nodes: Ray").
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
from ftflow.utils import PROJECT_ROOT, sha256_json, sha256_sources, state_dir
from tasks.train_worker import COMPLETE_MARKER, Job, is_complete_checkpoint, latest_complete_checkpoint

log = logging.getLogger("ftflow.train")


def code_identity() -> str:
    """The code that decides the trained weights and what the final folder holds: the rank recipe,
    its collators and its loss. (An edit there starts a new training folder; the old one stays.)"""
    pkg = __name__.rsplit(".", 1)[0]
    return sha256_sources(f"{pkg}.train_worker", f"{pkg}.collate", f"{pkg}.loss")[:16]


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
    settings = train.model_dump(exclude={"timeout_minutes", "node_rank", "master_addr", "master_port", "logging_steps",
                                         "launcher", "ray"})
    if train.launcher == "ray":  # the world size and device kind; where and how it is scheduled are launch-only
        settings["ray"] = {"num_workers": train.ray.num_workers, "gpu": train.ray.resources_per_worker.get("GPU", 0) > 0}
    return sha256_json(
        {"train": settings, "data": dataset_key, "model": model_fingerprint, "template": template_text, "code": code_identity()}
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


def _supervise(
    cmd: list[str],
    train: TrainConfig,
    log_dir: Path,
    on_line: Callable[[str], None] | None,
    on_start: Callable[[subprocess.Popen], None] | None,
    keep_fds: tuple[int, ...],
) -> tuple[int, str]:
    """Run a launcher process (torchrun, or the Ray driver) to the end: its output streamed to
    `on_line`, killed with everything it started on timeout or when this thread is interrupted.
    Returns (exit code, the last lines of its output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // train.nproc_per_node)))
    env["PYTHONUNBUFFERED"] = "1"
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
    ranks: dict[int, psutil.Process] = {}  # every process the launcher started, to be sure none survives it
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
        kill_group(proc)
    return proc.returncode, "\n".join(tail)


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
    log.info("launching %d rank(s): %s", train.nproc_per_node * train.nnodes, " ".join(cmd))
    returncode, output = _supervise(cmd, train, log_dir, on_line, on_start, keep_fds)
    if returncode != 0:
        rank, code = _failed_rank(output)
        code = code if code is not None else returncode
        rank_tail = _rank_log_tail(log_dir, rank)
        error = _rank_error_of(log_dir, rank)  # the rank's own log: torchrun's output has torchrun's traceback
        raise TrainingFailed(
            f"training failed: rank {rank if rank is not None else '?'} exited with code {code}"
            + (f" ({describe_exit(code)})" if code is not None and code < 0 else "") + ". "
            f"All ranks were stopped; the next run resumes from the latest complete checkpoint. "
            f"Full logs: {log_dir}\n" + (f"error:\n{error}\n" if error else "") + f"log tail:\n{rank_tail or output[-4000:]}",
            rank, code, rank_tail, error,
        )


def launch_ray(
    job_path: Path,
    train: TrainConfig,
    log_dir: Path,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    keep_fds: tuple[int, ...] = (),
) -> None:
    """Run the ranks on a Ray cluster through the driver process of `tasks.train_ray`, supervised
    like torchrun: it dies with this process, and a failed worker is reported like a failed rank."""
    from tasks.train_ray import FAILURE_FILE, RaySpec, driver_command, propagated_env

    log_dir.mkdir(parents=True, exist_ok=True)
    r = train.ray
    spec = RaySpec(
        job_path=str(job_path), log_dir=str(log_dir), address=r.address, num_workers=r.num_workers,
        resources_per_worker=dict(r.resources_per_worker), placement_strategy=r.placement_strategy,
        schedule_timeout_s=r.schedule_timeout_s, max_failures=r.max_failures,
        storage_path=str(job_path.parent / "ray"), run_name=log_dir.name, env=propagated_env(),
    )
    spec_path = job_path.with_name("ray-spec.json")
    spec_path.write_text(json.dumps(asdict(spec), indent=2))
    cmd = driver_command(spec_path)
    log.info("launching %d rank(s) on the Ray cluster %s: %s", r.num_workers, r.address, " ".join(cmd))
    returncode, output = _supervise(cmd, train, log_dir, on_line, on_start, keep_fds)
    if returncode == 0:
        return
    failure_file = log_dir / FAILURE_FILE
    failure = json.loads(failure_file.read_text()) if failure_file.is_file() else {}
    rank, code, worker = failure.get("rank"), failure.get("exit_code"), failure.get("worker") or {}
    if not failure and returncode < 0:
        raise TrainingFailed(
            f"the Ray driver was stopped by signal {-returncode}; Ray stopped its workers with it. The next run resumes "
            f"from the latest complete checkpoint. Full logs: {log_dir}\n{output[-2000:]}", None, returncode, output[-4000:],
        )
    if rank is None:  # nothing ran: no cluster, or one too small
        raise TrainingFailed(
            f"training did not start on Ray: {failure.get('error') or output[-4000:]}", None, code, output[-4000:]
        )
    where = f" (node {worker.get('node_ip', '?')}, pid {worker.get('pid', '?')})"
    how = f"exited with code {code}" if code is not None else ("died" if failure.get("process_died") else "failed")
    rank_tail = _ray_log_tail(log_dir, rank)
    raise TrainingFailed(
        f"training failed: rank {rank}{where} {how}. All workers were stopped; the next run resumes from the "
        f"latest complete checkpoint. Full logs: {log_dir}\nRay: {failure.get('error', '')[-1500:]}\n{rank_tail}",
        rank, code, rank_tail,
    )


def _ray_log_tail(log_dir: Path, rank: int, lines: int = 40) -> str:
    f = log_dir / f"rank-{rank}.log"
    if not f.is_file():
        return ""
    text = f.read_text(errors="replace").strip().splitlines()
    return (f"--- {f.name} ---\n" + "\n".join(text[-lines:]))[-6000:]


def training_root(train: TrainConfig) -> Path:
    """Where training folders live: train.ray.storage_path for Ray runs that set it (a folder every
    node mounts), else <FTFLOW_HOME>/train."""
    if train.launcher == "ray" and train.ray.storage_path:
        return Path(train.ray.storage_path).expanduser().resolve()
    return state_dir() / "train"


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
    resume = latest_complete_checkpoint(ckpt_root, train.max_steps)
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
    if train.launcher == "torchrun" and train.nnodes > 1:
        raise TrainingFailed(
            "train.nnodes > 1 with train.launcher=torchrun is not supported: every node would run the whole flow, and "
            "each would hold the gpu slot and this folder's lock while waiting for the others. Use train.launcher=ray "
            "(README, \"Several nodes: Ray\"), where one flow run drives every node.", None, None, "",
        )
    run_launcher = launch_ray if train.launcher == "ray" else launch
    run_launcher(job_path, train, train_dir / "logs" / time.strftime("%Y%m%d-%H%M%S"), on_line=on_line, on_start=on_start,
                 keep_fds=(lock_fd,))
    attempt = train_dir / "job-attempt.json"  # Ray: the last attempt's resume point (a restart moves it)
    if train.launcher == "ray" and attempt.is_file():
        resume = Job.load(attempt).resume_from
    if not is_complete_checkpoint(final):
        raise TrainingFailed(f"training exited cleanly but {final} has no {COMPLETE_MARKER}", None, 0, "")
    summary = json.loads((final / "train_summary.json").read_text())
    return {**summary, "reused": False, "resumed_from": str(resume) if resume else None, "final_dir": str(final)}
