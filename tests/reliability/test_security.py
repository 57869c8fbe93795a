"""Safe defaults: no remote code unless asked, safetensors only, no unsafe torch.load, names that
come from users cannot make ftflow write outside its folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftflow.config import ConfigError, ModelConfig, load_config, validate

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("flows", "tasks", "infra", "ftflow", "bench")


def _code_files():
    for d in CODE_DIRS:
        yield from (REPO / d).rglob("*.py")


def test_trust_remote_code_defaults_false_and_is_never_hard_coded():
    assert ModelConfig().trust_remote_code is False
    offenders = [f"{f}:{i}" for f in _code_files() for i, line in enumerate(f.read_text().splitlines(), 1)
                 if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert offenders == []


def test_no_torch_load_without_weights_only():
    offenders = []
    for f in _code_files():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


def test_export_writes_safetensors_only(tiny_model_dir, tmp_path):
    """consolidate() from a plain (non-DeepSpeed) final folder: the export holds no pickle files."""
    import shutil

    from tasks.consolidate import consolidate
    from tasks.train_worker import COMPLETE_MARKER

    final = tmp_path / "final"
    shutil.copytree(tiny_model_dir, final)
    (final / COMPLETE_MARKER).write_text("{}")
    out = consolidate(final, str(tiny_model_dir), tmp_path / "export")
    suffixes = {p.suffix for p in out.iterdir()}
    assert ".safetensors" in suffixes and not suffixes & {".bin", ".pt", ".pth", ".pkl"}


@pytest.mark.parametrize("field,value", [
    ("name", "../../etc"), ("name", "a/b"), ("name", "/abs"), ("name", ".hidden"),
    ("registry.model_name", "../escape"), ("registry.model_name", "x/../../y"),
])
def test_user_names_cannot_traverse_paths(field, value):
    raw = {"data": {"train": ["a.jsonl"]}}
    section, _, key = field.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[key] = value
    with pytest.raises(ConfigError):
        validate(raw)


def test_secret_config_values_are_masked(tmp_path):
    from tasks.lineage import flatten, redact

    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.hub_token=canary-4242"])
    dumped = cfg.model_dump(mode="json")
    assert "canary-4242" not in str(dumped)
    assert cfg.model.hub_token.get_secret_value() == "canary-4242"
    assert redact({"a": {"api_key": "x", "password": "y", "n": 1}}) == {"a": {"api_key": "***", "password": "***", "n": 1}}
    assert "canary" not in str(flatten(redact({"x": {"hf_token": "canary"}})))
