"""Config problems are one short message naming the key or path and the fix (issue #17), and
`model.name_or_path` resolves like data paths: against the config file's folder (issue #16.5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.config import ConfigError, load_config, looks_like_path, quote

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def alias_bomb(levels: int = 9) -> str:
    """The 'billion laughs' YAML: 9 ** levels strings once expanded, a few hundred bytes as text."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\ndata: {{train: *a{levels - 1}}}\ntrain: {{seed: *a{levels - 1}}}\n"


def _deepspeed(tmp_path: Path, name: str, content: str | None) -> str:
    p = tmp_path / name
    if content is None:
        p.mkdir()
    else:
        p.write_text(content)
    return str(p)


# (case id, how to build (config path, overrides) in tmp_path, fragments the message must hold)
CASES = [
    ("set-unclosed-list",
     lambda t: (REPO / "configs/demo.yaml", ["train.seed=[1,"]),
     ["--set 'train.seed=[1,'", "not valid YAML", "close the brackets"]),
    ("set-empty-key-part",
     lambda t: (REPO / "configs/demo.yaml", ["train..seed=1"]),
     ["--set 'train..seed=1'", "dotted names"]),
    ("config-is-folder",
     lambda t: (write(t / "cfgs" / "a.yaml", "data: {train: [x]}\n").parent, []),
     ["is a folder", "pass a pipeline YAML file", "a.yaml"]),
    ("config-not-utf8",
     lambda t: ((t / "latin1.yaml").write_bytes("data: {train: [caf\u00e9.jsonl]}\n".encode("latin-1")) and t / "latin1.yaml", []),
     ["latin1.yaml is not UTF-8 text", "byte 0xe9", "save it as UTF-8"]),
    ("deepspeed-folder",
     lambda t: (REPO / "configs/demo.yaml", [f"train.deepspeed={_deepspeed(t, 'ds', None)}"]),
     ["train.deepspeed:", "is a folder, not a DeepSpeed JSON file", "configs/deepspeed/zero2.json"]),
    ("deepspeed-list",
     lambda t: (REPO / "configs/demo.yaml", [f"train.deepspeed={_deepspeed(t, 'l.json', '[1, 2]')}"]),
     ["train.deepspeed:", "holds a JSON list, not an object"]),
    ("deepspeed-zero-is-int",
     lambda t: (REPO / "configs/demo.yaml", [f"train.deepspeed={_deepspeed(t, 'z.json', json.dumps({'zero_optimization': 3}))}"]),
     ["train.deepspeed:", '"zero_optimization" must be an object such as {"stage": 3}, got 3']),
    ("deepspeed-bad-json",
     lambda t: (REPO / "configs/demo.yaml", [f"train.deepspeed={_deepspeed(t, 'b.json', '{oops')}"]),
     ["train.deepspeed:", "line 1, column 2 is not valid JSON"]),
    ("deepspeed-stage-7",
     lambda t: (REPO / "configs/demo.yaml", [f"train.deepspeed={_deepspeed(t, 's.json', json.dumps({'zero_optimization': {'stage': 7}}))}"]),
     ["zero_optimization.stage must be 0, 1, 2 or 3, got 7"]),
    ("deepspeed-missing",
     lambda t: (REPO / "configs/demo.yaml", ["train.deepspeed=configs/deepspeed/zero4.json"]),
     ["train.deepspeed: configs/deepspeed/zero4.json does not exist"]),
    ("model-relative-missing",
     lambda t: (write(t / "proj" / "c.yaml", "data: {train: [a.jsonl]}\nmodel: {name_or_path: ../models/nope}\n"), []),
     ["model.name_or_path: ../models/nope does not exist", "(resolved to {t}/models/nope)", "config file's folder"]),
    ("model-dot-slash-missing",
     lambda t: (write(t / "c.yaml", "data: {train: [a.jsonl]}\nmodel: {name_or_path: ./m}\n"), []),
     ["model.name_or_path: ./m does not exist", "(resolved to {t}/m)"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_config_problem_is_one_clear_message(tmp_path, case):
    _, build, fragments = case
    path, overrides = build(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    for frag in fragments:
        assert frag.replace("{t}", str(tmp_path)) in msg, msg
    assert "Traceback" not in msg and len(msg) < 1000


def test_alias_bomb_error_is_bounded(tmp_path):
    """A YAML alias bomb (9**9 strings once expanded) is refused in a message of bounded size."""
    p = write(tmp_path / "bomb.yaml", alias_bomb())
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "'data.train.0': Input should be a valid string" in msg
    assert "more problems" in msg  # 9 + 1 + 9 problems, 10 listed
    assert len(msg) < 3000, len(msg)


def test_quote_is_bounded():
    big = ["x" * 10_000] * 10_000
    assert len(quote(big)) <= 120 and len(quote("y" * 1_000_000)) <= 120
    assert quote(3) == "3" and quote("abc") == "'abc'"


def test_relative_model_folder_resolves_against_config_folder(tmp_path, monkeypatch):
    """`../models/m` next to the config's folder is found whatever the working directory is."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    cfg_path = write(tmp_path / "proj" / "c.yaml", "data: {train: [a.jsonl]}\nmodel: {name_or_path: ../models/m}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(cfg_path).model.name_or_path == str(model)
    # the same folder named relative to the project ("models/m") from a config one level up
    cfg2 = write(tmp_path / "c2.yaml", "data: {train: [a.jsonl]}\nmodel: {name_or_path: models/m}\n")
    assert load_config(cfg2).model.name_or_path == str(model)
    # an --set override is read from the config's folder too
    assert load_config(cfg_path, ["model.name_or_path=../models/m"]).model.name_or_path == str(model)


@pytest.mark.parametrize("value", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "embedded:tiny-qwen2", "org/model.v1-2_x"])
def test_hub_ids_and_embedded_stay_as_they_are(tmp_path, value):
    cfg = load_config(write(tmp_path / "c.yaml", f"data: {{train: [a.jsonl]}}\nmodel: {{name_or_path: '{value}'}}\n"))
    assert cfg.model.name_or_path == value
    assert not looks_like_path(value)


@pytest.mark.parametrize("value", ["./m", "../models/x", "/abs/model", "~/m", "a/b/c", ".", "models\\m"])
def test_path_looking_values(value):
    assert looks_like_path(value)
