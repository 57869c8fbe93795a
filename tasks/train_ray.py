"""Run the training ranks on a Ray cluster (`train.launcher: ray`).

Two halves, both plain Python:

- the *driver*, `python -m tasks.train_ray SPEC.json`, started and supervised by `tasks.train`
  exactly like torchrun (own session, SIGTERM when the flow process dies, killed on timeout). It
  connects to the cluster, reserves every worker at once in one placement group (or fails after
  `schedule_timeout_s` naming what is missing), runs Ray Train's `TorchTrainer` and echoes rank 0's
  log to its stdout, which the flow streams into its logs. The Ray Train controller is an actor
  owned by this driver, so when the driver dies (the flow run is cancelled or killed) Ray stops the
  controller and every worker with it.
- `worker_entry`, what each Ray Train worker runs: Ray has already joined the torch process group
  (gloo on CPU, NCCL on GPU) and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, so the unchanged
  rank recipe `tasks.train_worker.main` initialises DeepSpeed on it as it does under torchrun. Each
  attempt (the first, and every restart after a worker died when `max_failures` > 0) resumes from
  the latest complete checkpoint in the shared training folder.

Every worker's output goes to `<log_dir>/rank-N.log` in the shared training folder; when the run
fails, `<log_dir>/failure.json` names the worker (rank, node, pid), how it ended and its log tail.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("ftflow.train")

FAILURE_FILE = "failure.json"
# Environment the workers need from the flow's machine (Ray workers inherit the raylet's, not ours).
PROPAGATED_ENV_PREFIXES = ("HF_", "FTFLOW_", "MLFLOW_", "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "DS_")


@dataclass
class RaySpec:
    """What the driver needs; written by `tasks.train` next to the job file."""

    job_path: str
    log_dir: str
    address: str
    num_workers: int
    resources_per_worker: dict[str, float]
    placement_strategy: str
    schedule_timeout_s: float
    max_failures: int
    storage_path: str  # Ray's own run state (the trainer's checkpoints are the DeepSpeed ones in the training folder)
    run_name: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "RaySpec":
        return cls(**json.loads(Path(path).read_text()))

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0) > 0


def resolve_address(address: str) -> str:
    """`auto` defers to RAY_ADDRESS when it is set, as `ray` itself does."""
    return (os.environ.get("RAY_ADDRESS") or address) if address == "auto" else address


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds on a GCS address nobody answers on (ray.init would retry for minutes)."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"{address!r} is not HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {address} ({err})") from None


# The ranks read the model from a local folder, never from the Hub: the Hub token stays here
# (runtime_env variables are visible to whoever can read the cluster's dashboard).
WITHHELD_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def propagated_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k.startswith(PROPAGATED_ENV_PREFIXES) and k not in WITHHELD_ENV}


def driver_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "tasks.train_ray", str(spec_path)]


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


class ClusterTooSmall(RuntimeError):
    pass


def _nodes_summary(nodes: list[dict[str, Any]]) -> str:
    rows = []
    for n in nodes:
        if n.get("Alive"):
            res = {k: v for k, v in n.get("Resources", {}).items() if not k.startswith(("node:", "memory", "object_store"))}
            rows.append(f"{n.get('NodeManagerAddress')}: {res}")
    return "; ".join(rows) or "no alive node"


def fits(nodes: list[dict[str, Any]], bundle: dict[str, float], count: int, strategy: str) -> bool:
    """Whether `count` bundles can ever be placed on these nodes' *total* resources (ignoring what
    others use now): STRICT_SPREAD needs `count` distinct nodes, STRICT_PACK one node for all."""
    per_node = []
    for n in nodes:
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        k = min((int(res.get(name, 0) // amount) for name, amount in bundle.items() if amount > 0), default=count)
        per_node.append(k)
    if strategy == "STRICT_SPREAD":
        return sum(1 for k in per_node if k >= 1) >= count
    if strategy == "STRICT_PACK":
        return any(k >= count for k in per_node)
    return sum(per_node) >= count


def reserve_or_fail(spec: RaySpec) -> None:
    """All or nothing: wait up to `schedule_timeout_s` for a placement group holding every worker,
    then release it for the trainer. A cluster that can never hold them fails at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ask = f"{spec.num_workers} x {spec.resources_per_worker} ({spec.placement_strategy})"
    nodes = ray.nodes()
    if not fits(nodes, spec.resources_per_worker, spec.num_workers, spec.placement_strategy):
        raise ClusterTooSmall(
            f"the Ray cluster can never hold train.ray.num_workers={spec.num_workers} workers of "
            f"train.ray.resources_per_worker={spec.resources_per_worker} with placement {spec.placement_strategy}: it has "
            f"{_nodes_summary(nodes)}. Add nodes, or lower train.ray.num_workers / resources_per_worker."
        )
    pg = placement_group([dict(spec.resources_per_worker) for _ in range(spec.num_workers)], strategy=spec.placement_strategy)
    try:
        if not pg.wait(timeout_seconds=spec.schedule_timeout_s):
            raise ClusterTooSmall(
                f"could not reserve {ask} within train.ray.schedule_timeout_s={spec.schedule_timeout_s:g} s: other jobs hold "
                f"the resources (available now: {ray.available_resources()}; nodes: {_nodes_summary(ray.nodes())}). "
                f"Nothing was started; run again when the cluster is free, or raise train.ray.schedule_timeout_s."
            )
    finally:
        remove_placement_group(pg)


def _tail_rank0(log_dir: Path, stop: threading.Event) -> None:
    """Echo rank 0's log (it grows on the shared folder; restarts append to it) to stdout."""
    path = log_dir / "rank-0.log"
    pos = 0
    while not stop.is_set():
        try:
            with open(path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                # only whole lines; a partial last line waits for its end
                cut = chunk.rfind("\n") + 1
                if cut:
                    sys.stdout.write(chunk[:cut])
                    sys.stdout.flush()
                    pos += len(chunk[:cut].encode())
        except FileNotFoundError:
            pass
        stop.wait(0.2)


def _exit_code_from(text: str) -> int | None:
    """The exit code when Ray's account of a dead worker states one ('exited with code 1'). Ray's
    usual account of a vanished process lists possible causes (OOM killer, SIGKILL, ...) rather than
    the signal, so none is guessed from it; the account itself goes into the report."""
    m = re.search(r"exit(?:ed with)? code[:\s]+(-?\d+)", text, re.I)
    return int(m.group(1)) if m else None


def describe_failure(err: BaseException, log_dir: Path) -> dict[str, Any]:
    """The worker to blame: one whose process died (the others then fail on the broken process
    group), else the lowest failing rank."""
    from ray.exceptions import RayActorError

    failures: dict[int, BaseException] = dict(getattr(err, "worker_failures", {}) or {})
    if not failures:
        return {"rank": None, "exit_code": None, "error": f"{type(err).__name__}: {err}"[-4000:], "worker": {}}
    died = [r for r, e in failures.items() if isinstance(e, RayActorError) or isinstance(getattr(e, "health_check_failure", None), RayActorError)]
    rank = min(died) if died else min(failures)
    text = str(failures[rank])
    worker_file = log_dir / f"worker-{rank}.json"
    worker = json.loads(worker_file.read_text()) if worker_file.is_file() else {}
    return {
        "rank": rank,
        "exit_code": _exit_code_from(text),
        "process_died": bool(died),
        "error": text[-4000:],
        "worker": worker,
        "other_ranks": {r: str(e)[-300:] for r, e in failures.items() if r != rank},
    }


def run_driver(spec: RaySpec) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ftflow
    import tasks

    log_dir = Path(spec.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    address = resolve_address(spec.address)
    try:
        check_reachable(address)
        ray.init(
            address=address, log_to_driver=False, logging_level=logging.WARNING,
            # the project's code travels to every node; its dependencies must be installed there
            runtime_env={"py_modules": [ftflow, tasks], "env_vars": spec.env},
        )
    except ConnectionError as err:
        _write_failure(log_dir, {
            "rank": None, "exit_code": None, "worker": {},
            "error": f"no Ray cluster at train.ray.address={address!r} ({err}). Start one (`ray start --head`) or set "
                     f"train.ray.address / RAY_ADDRESS to the head's HOST:PORT.",
        })
        return 2
    stop = threading.Event()
    tail = threading.Thread(target=_tail_rank0, args=(log_dir, stop), daemon=True)
    try:
        reserve_or_fail(spec)
        log.info("reserved %d Ray worker(s) of %s (%s); starting TorchTrainer",
                 spec.num_workers, spec.resources_per_worker, spec.placement_strategy)
        tail.start()
        trainer = TorchTrainer(
            worker_entry,
            train_loop_config={"job_path": spec.job_path, "log_dir": spec.log_dir},
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                resources_per_worker=dict(spec.resources_per_worker), placement_strategy=spec.placement_strategy,
            ),
            run_config=RunConfig(
                name=spec.run_name, storage_path=spec.storage_path,
                failure_config=FailureConfig(max_failures=spec.max_failures),
            ),
        )
        trainer.fit()
        return 0
    except ClusterTooSmall as err:
        _write_failure(log_dir, {"rank": None, "exit_code": None, "worker": {}, "error": str(err)})
        return 3
    except Exception as err:  # a failed worker (after max_failures restarts) or the controller
        _write_failure(log_dir, describe_failure(err, log_dir))
        return 1
    finally:
        stop.set()
        if tail.is_alive():
            tail.join(timeout=5)
        ray.shutdown()


def _write_failure(log_dir: Path, failure: dict[str, Any]) -> None:
    tmp = log_dir / (FAILURE_FILE + ".tmp")
    tmp.write_text(json.dumps(failure, indent=2, default=str))
    os.replace(tmp, log_dir / FAILURE_FILE)
    log.error("%s", failure["error"])


def main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [ray-driver] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    return run_driver(RaySpec.load(spec_path))


# ---------------------------------------------------------------------------------------------
# Worker side (inside a Ray Train worker process)
# ---------------------------------------------------------------------------------------------


def _check_visible(job: Any) -> None:
    """Every node must see the model, data and training folder at the same paths."""
    import socket

    for what, p in (("tokenized dataset", job.dataset_path), ("training folder", job.output_dir)):
        if not Path(p).exists():
            raise FileNotFoundError(
                f"{what} {p} is not visible on node {socket.gethostname()}: put FTFLOW_HOME (and train.ray.storage_path) "
                f"on a filesystem every Ray node mounts at the same path."
            )
    if Path(job.model_path).is_absolute() and not Path(job.model_path).exists():
        raise FileNotFoundError(f"base model {job.model_path} is not visible on node {socket.gethostname()}; "
                                "put FTFLOW_HOME on a filesystem every Ray node mounts.")


def prepare_attempt(job_path: Path) -> Path:
    """Rank 0, before every attempt: drop partial checkpoints and point the job at the latest
    complete one (a restart after a dead worker continues from there, as a re-run would)."""
    from tasks.train import clean_partial_checkpoints
    from tasks.train_worker import Job, latest_complete_checkpoint

    job = Job.load(job_path)
    ckpt_root = Path(job.output_dir) / "checkpoints"
    for p in clean_partial_checkpoints(ckpt_root):
        log.warning("removed incomplete checkpoint %s", p)
    resume = latest_complete_checkpoint(ckpt_root, job.train["max_steps"])
    job.resume_from = str(resume) if resume else None
    attempt = job_path.with_name("job-attempt.json")
    tmp = attempt.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(job), indent=2))
    os.replace(tmp, attempt)
    return attempt


def worker_entry(config: dict[str, Any]) -> None:
    import socket

    import ray.train
    import torch.distributed as dist

    from tasks import train_worker

    rank = ray.train.get_context().get_world_rank()
    log_dir = Path(config["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"worker-{rank}.json").write_text(json.dumps({
        "rank": rank, "pid": os.getpid(), "node": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
    }))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_dir / f"rank-{rank}.log", "a", buffering=1) as out:
        os.dup2(out.fileno(), 1)  # every byte the rank writes (logging, DeepSpeed, tracebacks) lands here
        os.dup2(out.fileno(), 2)
        try:
            out.write(f"=== rank {rank} pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
            out.flush()
            job_path = Path(config["job_path"])
            _check_visible(train_worker.Job.load(job_path))
            if rank == 0:
                prepare_attempt(job_path)
            dist.barrier()
            code = train_worker.main(str(job_path.with_name("job-attempt.json")))
            if code:
                raise RuntimeError(f"rank {rank}: tasks.train_worker exited with code {code}")
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
