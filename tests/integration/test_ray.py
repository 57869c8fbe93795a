"""Training on a real two-node Ray cluster (`train.launcher: ray`), started here on 127.0.0.1.

A head node and a second node (`ray.cluster_utils.Cluster`: a GCS and two raylets, each node with
1 CPU), one worker per node (STRICT_SPREAD), DeepSpeed ZeRO-3 over gloo. Checked against the
torchrun launcher, which is the independent reference: the same config gives the same losses and
the same consolidated weights (≤ 1e-6). Then a worker is SIGKILLed (the run fails naming it; the
next run resumes), a worker is SIGKILLed with `max_failures: 1` (Ray restarts the group in the same
run from the latest complete checkpoint), the driver is SIGKILLed (the workers stop with it), and
a cluster too small fails at once. The cluster and every process it started are gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoTokenizer

pytest.importorskip("ray.train", reason="ray is optional: pip install 'ftflow[ray]' (make setup installs it)")

from ftflow.config import TrainConfig
from tasks.consolidate import materialise, trained_state_dict
from tasks.tokenize import tokenize_dataset
from tasks.train import TrainingFailed, run_training
from tasks.train_worker import latest_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

STEPS, SAVE_EVERY = 6, 2  # checkpoints after steps 2 and 4


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on 127.0.0.1; afterwards no process of theirs is left."""
    from ray.cluster_utils import Cluster

    # Ray replaces 127.0.0.1 in an address by the machine's outward IP unless told it is a
    # one-host cluster (ray._private.services.get_node_ip_address); the driver inherits this.
    old = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    # Processes that other tests left running on purpose (a session-wide service stack) are not the cluster's.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    c = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    try:
        c.add_node(**args)
        c.wait_for_nodes()
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert len({n.unique_id for n in c.list_all_nodes()}) == 2
        yield c
    finally:
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old
    gone, alive = psutil.wait_procs([p for p in started if p.is_running()], timeout=30)
    assert not alive, f"processes of the Ray cluster left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    rows = (REPO / "data/demo/reverse_train.jsonl").read_text().splitlines()[:96]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    tok = tokenize_dataset(root / "train.jsonl", str(tiny_model_dir), cache_root=root / "cache", max_length=64)
    return str(tok.path), AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id


def _config(launcher: str, address: str = "auto", **ray) -> TrainConfig:
    return TrainConfig(
        mode="full", deepspeed="configs/deepspeed/zero3.json", nproc_per_node=2, max_steps=STEPS,
        micro_batch_size=4, learning_rate=1e-3, warmup_ratio=0.2, lr_scheduler="cosine",
        save_steps=SAVE_EVERY, save_total_limit=3, logging_steps=1, seed=3, timeout_minutes=6,
        launcher=launcher,
        ray={"address": address, "num_workers": 2, "resources_per_worker": {"CPU": 1},
             "placement_strategy": "STRICT_SPREAD", "schedule_timeout_s": 20, **ray},
    )


def _train(train: TrainConfig, train_dir: Path, model_dir: Path, dataset, **kw):
    path, pad = dataset
    return run_training(train=train, train_dir=train_dir, model_path=str(model_dir), dataset_path=path,
                        pad_token_id=pad, **kw)


def _losses(summary) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in summary["log_history"] if "loss" in h}


def _weights(summary) -> dict[str, torch.Tensor]:
    return materialise(trained_state_dict(Path(summary["final_dir"])))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _workers(train_dir: Path) -> list[dict]:
    """The worker records of the newest launch (rank, pid, node id), written by each Ray worker."""
    logs = max((train_dir / "logs").iterdir(), key=lambda p: p.name)
    return [json.loads(f.read_text()) for f in sorted(logs.glob("worker-*.json"))]


def _kill_rank_after_step(train_dir: Path, n: int, rank: int = 1):
    """An on_line hook: once rank 0's streamed log shows step n, SIGKILL the worker of `rank`."""
    killed: list[int] = []

    def on_line(line: str) -> None:
        if killed or not re.search(rf"step {n}/{STEPS}", line):
            return
        pid = next(w["pid"] for w in _workers(train_dir) if w["rank"] == rank)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    return on_line, killed


@pytest.fixture(scope="module")
def straight(cluster, tiny_model_dir, dataset, tmp_path_factory):
    """An uninterrupted Ray run, and the torchrun run of the same config."""
    root = tmp_path_factory.mktemp("ray-straight")
    lines: list[str] = []
    ray_run = _train(_config("ray", cluster.address), root / "ray", tiny_model_dir, dataset, on_line=lines.append)
    torchrun = _train(_config("torchrun"), root / "torchrun", tiny_model_dir, dataset)
    return {"ray": ray_run, "torchrun": torchrun, "lines": lines, "dir": root / "ray"}


def test_two_node_ray_run_equals_torchrun(straight):
    ray_run, torchrun = straight["ray"], straight["torchrun"]
    workers = _workers(straight["dir"])
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, f"the two ranks did not run on two nodes: {workers}"
    assert ray_run["world_size"] == torchrun["world_size"] == 2 and ray_run["deepspeed_stage"] == 3
    assert ray_run["global_step"] == STEPS and ray_run["resumed_from"] is None
    # rank 0's progress reached the caller (the flow logs it), step by step
    assert any(f"step {STEPS}/{STEPS}" in line for line in straight["lines"])
    assert sorted(_losses(ray_run)) == list(range(1, STEPS + 1))
    torch.testing.assert_close(_losses(ray_run), _losses(torchrun), rtol=1e-6, atol=1e-6)
    diff = _max_diff(_weights(ray_run), _weights(torchrun))
    assert diff <= 1e-6, f"the Ray run's weights differ from torchrun's by {diff:.3e}"


def test_killed_worker_is_reported_then_resumed(cluster, straight, tiny_model_dir, dataset, tmp_path):
    train_dir = tmp_path / "crashed"
    # 1. max_failures 0 (the default): the run fails like a failed torchrun rank, naming the worker
    on_line, killed = _kill_rank_after_step(train_dir, 3)
    with pytest.raises(TrainingFailed) as err:
        _train(_config("ray", cluster.address), train_dir, tiny_model_dir, dataset, on_line=on_line)
    assert killed and err.value.rank == 1
    message = str(err.value)
    assert f"pid {killed[0]}" in message and err.value.log_tail.startswith("--- rank-1.log")
    ckpts = train_dir / "checkpoints"
    last = latest_complete_checkpoint(ckpts)  # step 3 was logged, so checkpoint-2 was complete
    assert last is not None and int(last.name.split("-")[1]) >= SAVE_EVERY
    assert not psutil.pid_exists(killed[0])

    # 2. the next run resumes from there; a worker killed again in its first step is restarted by
    # Ray (max_failures 1) from the latest complete checkpoint, within the same run
    on_line, killed_again = _kill_rank_after_step(train_dir, int(last.name.split("-")[1]) + 1)
    resumed = _train(_config("ray", cluster.address, max_failures=1), train_dir, tiny_model_dir, dataset, on_line=on_line)
    assert killed_again and resumed["global_step"] == STEPS
    assert resumed["resumed_from"] and Path(resumed["resumed_from"]).parent == ckpts
    rank0_log = max((train_dir / "logs").iterdir()).joinpath("rank-0.log").read_text()
    assert rank0_log.count("=== rank 0") == 2, "Ray did not restart the workers"
    assert f"resuming from {resumed['resumed_from']}" in rank0_log
    diff = _max_diff(_weights(resumed), _weights(straight["ray"]))
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff:.3e}"
    after = {s: v for s, v in _losses(resumed).items() if s > int(Path(resumed["resumed_from"]).name.split("-")[1])}
    torch.testing.assert_close(after, {s: _losses(straight["ray"])[s] for s in after}, rtol=1e-5, atol=1e-6)


def test_killing_the_driver_stops_every_worker(cluster, tiny_model_dir, dataset, tmp_path):
    """What happens when the flow run is cancelled or its process dies: the driver gets SIGTERM
    (parent-death signal) or is killed; Ray then stops the controller and the workers it owned."""
    train_dir = tmp_path / "cancelled"
    driver: dict[str, subprocess.Popen] = {}
    workers: list[psutil.Process] = []

    def on_line(line: str) -> None:
        if workers or not re.search(rf"step 1/{STEPS}", line):
            return
        workers.extend(psutil.Process(w["pid"]) for w in _workers(train_dir))
        os.kill(driver["proc"].pid, signal.SIGKILL)

    with pytest.raises(TrainingFailed, match="driver was stopped by signal 9"):
        _train(_config("ray", cluster.address), train_dir, tiny_model_dir, dataset,
               on_start=lambda p: driver.update(proc=p), on_line=on_line)
    assert len(workers) == 2
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"Ray workers still running after their driver died: {alive}"


def test_cluster_too_small_fails_at_once(cluster, tiny_model_dir, dataset, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(TrainingFailed, match=r"can never hold train.ray.num_workers=3") as err:
        _train(_config("ray", cluster.address, num_workers=3), tmp_path / "big", tiny_model_dir, dataset)
    assert "127.0.0.1" in str(err.value)  # it lists the nodes it has
    assert time.monotonic() - t0 < 60


def test_no_cluster_at_the_address_fails_naming_it(tiny_model_dir, dataset, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrainingFailed, match=rf"no Ray cluster at train.ray.address='127.0.0.1:{port}'"):
        _train(_config("ray", f"127.0.0.1:{port}"), tmp_path / "nocluster", tiny_model_dir, dataset)
