"""Bad input is refused before any heavy work, with one paragraph naming the file/key and the fix."""

from __future__ import annotations

import json
import os
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


# ----------------------------------------------------------------------------- config cases (issue #17)
# Each through `ftflow run` in a subprocess: exit 2, one `error:` message naming the key or path and
# the fix, no traceback, bounded output, and nothing started (no run folder under FTFLOW_HOME).


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\ndata: {train: *a8}\ntrain: {seed: *a8}\n"


DEMO = str(REPO / "configs" / "demo.yaml")
ZERO_INT = json.dumps({"zero_optimization": 3})
CONFIG_CASES = [
    # (id, argv builder(tmp) -> (argv, extra env), message fragments)
    ("set-unclosed-list", lambda t: ([DEMO, "--set", "train.seed=[1,"], {}),
     ["--set 'train.seed=[1,'", "is not valid YAML"]),
    ("config-is-a-folder", lambda t: ([str(REPO / "configs")], {}),
     ["is a folder; pass a pipeline YAML file"]),
    ("config-not-utf8", lambda t: ([str(_write(t / "c.yaml", "data: {train: [caf\u00e9]}\n".encode("latin-1")))], {}),
     ["is not UTF-8 text (byte 0xe9", "save it as UTF-8"]),
    ("config-name-not-utf8", lambda t: ([os.fsdecode(bytes(t) + b"/\xff.yaml")], {}),
     ["\\udcff.yaml does not exist"]),
    ("deepspeed-folder", lambda t: ([DEMO, "--set", f"train.deepspeed={t}"], {}),
     ["train.deepspeed:", "is a folder, not a DeepSpeed JSON file"]),
    ("deepspeed-list", lambda t: ([DEMO, "--set", f"train.deepspeed={_write(t / 'l.json', '[1]')}"], {}),
     ["train.deepspeed:", "holds a JSON list"]),
    ("deepspeed-zero-int", lambda t: ([DEMO, "--set", f"train.deepspeed={_write(t / 'z.json', ZERO_INT)}"], {}),
     ["train.deepspeed:", '"zero_optimization" must be an object']),
    ("ftflow-home-is-a-file", lambda t: ([DEMO], {"FTFLOW_HOME": str(_write(t / "homefile", "x"))}),
     ["FTFLOW_HOME=", "is a file, not a folder"]),
    ("yaml-alias-bomb", lambda t: ([str(_write(t / "bomb.yaml", _alias_bomb()))], {}),
     ["'data.train.0': Input should be a valid string", "more problems"]),
    ("model-relative-path-missing",
     lambda t: ([str(_write(t / "proj" / "c.yaml", "data: {train: [../d.jsonl]}\nmodel: {name_or_path: ../models/nope}\n"))], {}),
     ["model.name_or_path: ../models/nope does not exist (resolved to", "models/nope)"]),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_cli_config_problem_is_one_message(tmp_path, case):
    _, build, fragments = case
    argv, extra = build(tmp_path)
    home = tmp_path / "home"
    env = {**os.environ, "FTFLOW_HOME": str(home), **extra}
    out = subprocess.run([sys.executable, "-m", "ftflow.cli", "run", *argv], capture_output=True, timeout=120, env=env)
    stderr = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 2, stderr[-3000:]
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    assert len(out.stdout) + len(out.stderr) < 4000  # never the input echoed back (the bomb expands to 9**9 items)
    for frag in fragments:
        assert frag in stderr, stderr
    assert not (home / "runs").exists()


def test_cli_model_relative_path_is_read_from_the_config_folder(tmp_path, tiny_model_dir):
    """`model.name_or_path: ../models/m` names a folder next to the config's folder, wherever ftflow runs."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "m")
    _write(tmp_path / "d.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    cfg = _write(tmp_path / "proj" / "c.yaml", "data: {train: [../d.jsonl]}\nmodel: {name_or_path: ../models/m}\n"
                 "train: {deepspeed: null, nproc_per_node: 1}\n")
    loaded = load_config(cfg)
    assert loaded.model.name_or_path == str(tmp_path / "models" / "m")
    check(loaded)  # preflight reads the resolved folder: weights, template, context all found
