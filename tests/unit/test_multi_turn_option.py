"""`tokenize.multi_turn`: validated once in the config, part of the cache key, refused in the API."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.config import ConfigError, load_config
from tasks.tokenize import TokenizeError, cache_key, tokenize_dataset
from tests.files import write_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_config_default_and_choices():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.tokenize.multi_turn == "auto"
    assert load_config(REPO / "configs" / "demo.yaml", ["tokenize.multi_turn=split"]).tokenize.multi_turn == "split"
    with pytest.raises(ConfigError, match="tokenize.multi_turn"):
        load_config(REPO / "configs" / "demo.yaml", ["tokenize.multi_turn=sometimes"])


def test_multi_turn_is_in_the_cache_key(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]}])
    keys = {m: cache_key(tmp_path / "in.jsonl", str(tiny_model_dir), "t", "sft", "all_assistant", 64, "drop",
                         multi_turn=m) for m in ("auto", "split", "reject")}
    assert len(set(keys.values())) == 3


def test_bad_value_is_refused_by_the_api(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    with pytest.raises(TokenizeError, match=r"tokenize\.multi_turn='often': choose auto, split, reject"):
        tokenize_dataset(tmp_path / "in.jsonl", str(tiny_model_dir), cache_root=tmp_path / "c", multi_turn="often")


def test_tokenize_cli_reports_the_split(tmp_path, monkeypatch, capsys):
    from tasks import tokenize as tk

    turns = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "b a"},
             {"role": "user", "content": "c d"}, {"role": "assistant", "content": "d c"}]
    write_jsonl(tmp_path / "canonical.jsonl", [{"id": "m", "messages": turns, "source": "t"}])
    monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: split-test\ndata:\n  train: [canonical.jsonl]\n  eval_fraction: 0.0\n")
    assert tk.tokenize_cli(str(cfg), ["tokenize.multi_turn=split"], as_json=False) == 0
    out = capsys.readouterr().out
    assert "samples  2 of 1 rows" in out
    assert "split    1 conversations into 2 samples, one per assistant turn {'multi_turn_split': 1}" in out
