"""Config validation: unknown keys name the closest valid key, overrides are validated like the file,
impossible combinations are refused with the alternative, and every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.config import ConfigError, PipelineConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_and_resolves_data_relative_to_file():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.nproc_per_node == 2 and cfg.train.deepspeed.endswith("zero3.json")
    assert Path(cfg.base_dir) == REPO / "configs"
    assert cfg.model.trust_remote_code is False


def test_misspelt_key_names_closest_valid_key(tmp_path):
    p = write(tmp_path, "data: {train: [a.jsonl]}\ntrain: {learnin_rate: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "train.learnin_rate" in msg and "Did you mean 'train.learning_rate'?" in msg and str(p) in msg


def test_misspelt_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'tokenize'"):
        load_config(write(tmp_path, "data: {train: [a.jsonl]}\ntokenise: {max_length: 10}\n"))


def test_missing_required_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(write(tmp_path, "name: x\n"))
    with pytest.raises(ConfigError, match="'train.micro_batch_size'"):
        load_config(write(tmp_path, "data: {train: [a]}\ntrain: {micro_batch_size: zero}\n"))


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3, column 4 is not valid YAML"):
        load_config(write(tmp_path, "data:\n  train: [a\n  x: ]\n"))


def test_overrides_are_dotted_typed_and_validated(tmp_path):
    p = write(tmp_path, "data: {train: [a.jsonl]}\n")
    cfg = load_config(p, ["train.seed=7", "train.lora.r=4", "data.eval=[b.jsonl]", "train.deepspeed=null"])
    assert cfg.train.seed == 7 and cfg.train.lora.r == 4 and cfg.data.eval == ["b.jsonl"] and cfg.train.deepspeed is None
    with pytest.raises(ConfigError, match="Did you mean 'train.seed'"):
        load_config(p, ["train.sead=7"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.seed"])


def test_qlora_with_zero3_is_rejected_with_alternative(tmp_path):
    p = write(tmp_path, "data: {train: [a]}\ntrain: {mode: qlora, deepspeed: configs/deepspeed/zero3.json}\n")
    with pytest.raises(ConfigError, match="zero2.json"):
        load_config(p)
    cfg = load_config(p, ["train.deepspeed=configs/deepspeed/zero2.json", "train.precision=bf16"])
    assert cfg.train.mode == "qlora"


def test_multi_node_needs_explicit_port(tmp_path):
    p = write(tmp_path, "data: {train: [a]}\ntrain: {nnodes: 2}\n")
    with pytest.raises(ConfigError, match="master_port"):
        load_config(p)


def test_run_name_cannot_escape_output_folder(tmp_path):
    with pytest.raises(ConfigError, match="'name'"):
        load_config(write(tmp_path, "name: ../../etc\ndata: {train: [a]}\n"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)
