"""The Ray launcher's plain logic: config rules, placement feasibility, address, training key.
(The real two-node cluster runs in tests/integration/test_ray.py.)"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ftflow.config import ConfigError, TrainConfig, validate
from tasks.train import train_key, training_root
from tasks.train_ray import _exit_code_from, fits, propagated_env, resolve_address


def _node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": cpu, "GPU": gpu, "memory": 1e9}}


def test_placement_feasibility_per_strategy():
    two = [_node(1), _node(1)]
    assert fits(two, {"CPU": 1}, 2, "STRICT_SPREAD")
    assert not fits(two, {"CPU": 1}, 3, "STRICT_SPREAD")
    assert not fits(two, {"CPU": 1}, 2, "STRICT_PACK")  # no node holds both
    assert fits([_node(8)], {"CPU": 4}, 2, "STRICT_PACK")
    assert fits(two, {"CPU": 1}, 2, "PACK") and not fits(two, {"CPU": 1}, 3, "PACK")
    assert not fits([_node(64, gpu=8), _node(64, gpu=8)], {"GPU": 1, "CPU": 8}, 17, "PACK")
    assert fits([_node(64, gpu=8), _node(64, gpu=8)], {"GPU": 1, "CPU": 8}, 16, "PACK")
    assert not fits([_node(64, gpu=8), _node(64, gpu=8, alive=False)], {"GPU": 1, "CPU": 8}, 16, "PACK")
    assert not fits([_node(4)], {"GPU": 1}, 1, "PACK")


def test_address_auto_defers_to_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address("auto") == "10.0.0.1:6379"
    assert resolve_address("10.0.0.2:6379") == "10.0.0.2:6379"  # an explicit address wins


def test_workers_get_only_the_environment_they_need():
    env = propagated_env({"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://x", "FTFLOW_HOME": "/s", "AWS_SECRET": "k",
                          "PATH": "/bin", "HF_TOKEN": "hf_x"})
    assert env == {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://x", "FTFLOW_HOME": "/s"}


def test_exit_code_from_rays_account_of_a_dead_worker():
    assert _exit_code_from("Worker exited with code 3") == 3 and _exit_code_from("exit code: -9") == -signal.SIGKILL
    # a list of possible causes is not an exit code
    assert _exit_code_from("Worker unexpectedly exits with a connection error code 2. End of file. "
                           "(1) The process is killed by SIGKILL by OOM killer due to high memory usage.") is None
    assert _exit_code_from("ValueError: bad") is None


def test_train_key_ray_counts_the_world_not_the_address():
    t = TrainConfig(launcher="ray", ray={"num_workers": 2})
    k = train_key(t, "d", "m", None)
    assert k == train_key(TrainConfig(launcher="ray", ray={"num_workers": 2, "address": "10.0.0.1:6379", "max_failures": 3,
                                                           "storage_path": "/other", "schedule_timeout_s": 5}), "d", "m", None)
    assert k != train_key(TrainConfig(launcher="ray", ray={"num_workers": 4}), "d", "m", None)
    assert k != train_key(TrainConfig(), "d", "m", None)
    # a torchrun config keeps its key (and so its checkpoints) whatever the ray section says
    assert train_key(TrainConfig(), "d", "m", None) == train_key(TrainConfig(ray={"num_workers": 9}), "d", "m", None)


def test_training_root_is_the_shared_storage_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "home"))
    assert training_root(TrainConfig()) == (tmp_path / "home" / "train").resolve()
    assert training_root(TrainConfig(launcher="ray", ray={"storage_path": str(tmp_path / "shared")})) == (tmp_path / "shared").resolve()
    assert training_root(TrainConfig(launcher="ray")) == (tmp_path / "home" / "train").resolve()


@pytest.mark.parametrize("train, expected", [
    ({"launcher": "ray", "nnodes": 2, "master_port": 29500, "master_addr": "10.0.0.1"}, "with train.launcher=ray set train.ray.num_workers"),
    ({"launcher": "ray", "ray": {"storage_path": "s3://bucket/ckpt"}}, "every node mounts at the same path"),
    ({"launcher": "slurm"}, "'train.launcher'"),
    ({"launcher": "ray", "ray": {"num_workers": 0}}, "'train.ray.num_workers'"),
    ({"launcher": "ray", "ray": {"placement_strategy": "ANYWHERE"}}, "'train.ray.placement_strategy'"),
    ({"launcher": "ray", "ray": {"num_worker": 2}}, "Did you mean 'train.ray.num_workers'?"),
])
def test_ray_config_mistakes_are_named(train, expected):
    with pytest.raises(ConfigError) as err:
        validate({"data": {"train": ["a.jsonl"]}, "train": train})
    assert expected in str(err.value)


def test_ray_config_valid():
    cfg = validate({"data": {"train": ["a.jsonl"]}, "train": {"launcher": "ray", "ray": {
        "num_workers": 16, "resources_per_worker": {"GPU": 1, "CPU": 8}, "storage_path": "/shared/train"}}})
    assert cfg.train.ray.resources_per_worker == {"GPU": 1.0, "CPU": 8.0} and cfg.train.ray.address == "auto"


def test_documented_ray_command_validates():
    """The overrides README and configs/qwen2.5-7b-lora-zero2.yaml give for two nodes x 8 GPUs."""
    from ftflow.config import load_config
    from ftflow.utils import PROJECT_ROOT

    path = PROJECT_ROOT / "configs/qwen2.5-7b-lora-zero2.yaml"
    overrides = ["train.launcher=ray", "train.ray.num_workers=16", "train.ray.resources_per_worker={GPU: 1, CPU: 8}",
                 "train.ray.storage_path=/shared/ftflow-train"]
    assert " ".join(f"--set {o}" if " " not in o else f"--set '{o}'" for o in overrides) in " ".join(
        line.lstrip("#").strip().rstrip("\\").strip() for line in path.read_text().splitlines()[:6])
    t = load_config(path, overrides).train
    assert (t.launcher, t.ray.num_workers, t.ray.resources_per_worker) == ("ray", 16, {"GPU": 1.0, "CPU": 8.0})
    assert training_root(t) == Path("/shared/ftflow-train")


def test_multi_node_torchrun_is_refused_before_anything_starts(tmp_path):
    from tasks.train import TrainingFailed, run_training

    train = TrainConfig(nnodes=2, node_rank=0, master_addr="10.0.0.1", master_port=29500)
    with pytest.raises(TrainingFailed, match="train.launcher=ray"):
        run_training(train=train, train_dir=tmp_path / "t", model_path="m", dataset_path="d", pad_token_id=0)
    assert not (tmp_path / "t" / "logs").exists()
