"""Every pipeline config in configs/ validates; every combination that cannot work is refused at load,
naming the key and the alternative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
PIPELINE_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((REPO / "configs/deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_every_pipeline_config_validates_and_documents_its_command(path):
    cfg = load_config(path)
    header = path.read_text().splitlines()[0]
    assert header.startswith("# "), f"{path.name} must start with a header comment"
    assert f"ftflow run configs/{path.name}" in path.read_text(), f"{path.name} header must show its command"
    if cfg.train.deepspeed:
        assert (REPO / cfg.train.deepspeed).is_file()
    for p in cfg.data.train + cfg.data.eval:
        assert (path.parent / p).exists(), f"{path.name}: data file {p} is missing"


def test_real_model_configs_say_what_they_need():
    expected = {
        "qwen2.5-0.5b-full-zero3.yaml": ("Qwen/Qwen2.5-0.5B-Instruct", "full", 3),
        "qwen2.5-7b-lora-zero2.yaml": ("Qwen/Qwen2.5-7B-Instruct", "lora", 2),
        "qwen2.5-7b-qlora-zero2.yaml": ("Qwen/Qwen2.5-7B-Instruct", "qlora", 2),
    }
    for name, (model, mode, stage) in expected.items():
        path = REPO / "configs" / name
        cfg = load_config(path)
        assert (cfg.model.name_or_path, cfg.train.mode) == (model, mode)
        assert json.loads((REPO / cfg.train.deepspeed).read_text())["zero_optimization"]["stage"] == stage
        assert cfg.train.precision == "bf16"
        # gradient checkpointing only where memory needs it, and the header says why either way
        assert "gradient checkpointing" in path.read_text().split("\nname:")[0].lower()
        assert cfg.model.trust_remote_code is False
        text = path.read_text()
        assert "GPUs:" in text and "GB" in text, f"{name}: header must give the GPUs and memory it expects"
    q = load_config(REPO / "configs/qwen2.5-7b-qlora-zero2.yaml").train.quant
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_configs_are_readable_and_documented(path):
    ds = json.loads(path.read_text())
    assert ds["_comment"] and ds["zero_optimization"]["stage"] in (2, 3)


def test_zero3_offload_config_offloads_params_and_optimizer():
    ds = json.loads((REPO / "configs/deepspeed/zero3_offload.json").read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["offload_param"]["device"] == "cpu" and ds["offload_optimizer"]["device"] == "cpu"


def _load(tmp_path, overrides):
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: [a.jsonl]}\n")
    return load_config(p, overrides)


REJECTED = [
    (["train.mode=qlora", "train.deepspeed=configs/deepspeed/zero3.json", "train.precision=bf16"],
     "Use configs/deepspeed/zero2.json, or train.mode=lora with ZeRO-3"),
    (["train.mode=qlora", "train.deepspeed=configs/deepspeed/zero3_offload.json", "train.precision=bf16"],
     "cannot run under DeepSpeed ZeRO-3"),
    (["train.mode=qlora", "train.deepspeed=configs/deepspeed/zero2.json", "train.precision=fp16"],
     "use precision=bf16"),
    (["train.nnodes=2", "train.master_addr=10.0.0.1"], "explicit train.master_port"),
    (["train.nnodes=2", "train.master_port=29500"], "train.master_addr set to node 0's address"),
    (["train.nnodes=2", "train.node_rank=2", "train.master_port=29500", "train.master_addr=10.0.0.1"],
     "train.node_rank=2 must be below train.nnodes=2"),
    (["train.deepspeed=configs/deepspeed/zero4.json"], "pick one of configs/deepspeed/zero2.json"),
    (["train.mode=qlora", "train.deepspeed=null", "train.precision=bf16", "train.quant.compute_dtype=float32"],
     "set train.quant.compute_dtype=bfloat16"),
    (["train.mode=full", "train.lora.merge=true"], "apply to train.mode=lora or qlora only"),
]


@pytest.mark.parametrize("overrides,fix", REJECTED, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_combination_is_rejected_with_the_alternative(tmp_path, overrides, fix):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, overrides)
    assert fix in str(err.value)


def test_several_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, ["train.mode=qlora", "train.deepspeed=configs/deepspeed/zero3.json", "train.precision=fp16",
                         "train.nnodes=2", "train.master_addr=10.0.0.1"])
    msg = str(err.value)
    assert "ZeRO-3" in msg and "precision=bf16" in msg and "master_port" in msg


ACCEPTED = [
    ["train.mode=qlora", "train.deepspeed=configs/deepspeed/zero2.json", "train.precision=bf16"],
    ["train.mode=qlora", "train.deepspeed=null", "train.nproc_per_node=1", "train.quant.compute_dtype=float32"],
    ["train.mode=lora", "train.deepspeed=configs/deepspeed/zero3_offload.json", "train.lora.use_dora=true"],
    ["train.nnodes=2", "train.node_rank=1", "train.master_port=29500", "train.master_addr=10.0.0.1"],
    ["train.mode=full", "train.deepspeed=configs/deepspeed/zero2.json", "train.precision=bf16"],
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=",".join)
def test_combination_that_works_is_accepted(tmp_path, overrides):
    _load(tmp_path, overrides)
