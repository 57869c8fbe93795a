"""Bad input is refused before any heavy work, with one paragraph naming the file/key and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftflow.config import load_config
from tasks.preflight import PreflightError, check

REPO = Path(__file__).resolve().parents[2]


def cfg_with(tmp_path: Path, model: str, extra: list[str] | None = None):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{train: [d.jsonl]}}\nmodel: {{name_or_path: '{model}'}}\ntrain: {{deepspeed: null, nproc_per_node: 1}}\n")
    return load_config(p, extra or [])


@pytest.fixture()
def model_copy(tmp_path, tiny_model_dir) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_demo_config_passes(tiny_model_dir):
    check(load_config(REPO / "configs" / "demo.yaml"))


def test_missing_data_file_is_named(tmp_path):
    cfg = cfg_with(tmp_path, "embedded:tiny-qwen2", ["data.train=[nope.jsonl]"])
    with pytest.raises(PreflightError, match=r"data.train: 'nope.jsonl' does not exist"):
        check(cfg)


def test_model_folder_without_weights(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(PreflightError, match=r"has no weights \(\*\.safetensors\).*pickle files"):
        check(cfg_with(tmp_path, str(model_copy)))


def test_model_needing_remote_code_is_refused_by_default(tmp_path, model_copy):
    cfg_file = model_copy / "config.json"
    config = json.loads(cfg_file.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(PreflightError, match=r"custom Python code.*model.trust_remote_code: true"):
        check(cfg_with(tmp_path, str(model_copy)))
    check(cfg_with(tmp_path, str(model_copy), ["model.trust_remote_code=true"]))  # explicit opt-in


def test_tokenizer_without_chat_template(tmp_path, model_copy):
    (model_copy / "chat_template.jinja").unlink()
    tc = json.loads((model_copy / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(PreflightError, match=r"tokenize.template: auto.*no chat template.*chatml"):
        check(cfg_with(tmp_path, str(model_copy)))
    check(cfg_with(tmp_path, str(model_copy), ["tokenize.template=chatml"]))


def test_max_length_beyond_context(tmp_path, model_copy):
    with pytest.raises(PreflightError, match=r"tokenize.max_length=4096 is larger than the model's context"):
        check(cfg_with(tmp_path, str(model_copy), ["tokenize.max_length=4096"]))


def test_all_problems_reported_at_once(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    cfg = cfg_with(tmp_path, str(model_copy), ["data.train=[nope.jsonl]", "tokenize.max_length=4096"])
    with pytest.raises(PreflightError) as err:
        check(cfg)
    assert str(err.value).count("\n  - ") == 3


def test_cli_refuses_before_heavy_work(tmp_path):
    """`ftflow run` on a bad config exits 2 within seconds, naming the key — no flow is started."""
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: [missing.jsonl]}\ntrain: {learning_rat: 1}\n")
    out = subprocess.run([sys.executable, "-m", "ftflow.cli", "run", str(p)], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "FTFLOW_HOME": str(tmp_path / "home")})
    assert out.returncode == 2
    assert "unknown key 'train.learning_rat'" in out.stderr and "Did you mean 'train.learning_rate'" in out.stderr
    assert not (tmp_path / "home" / "runs").exists()
