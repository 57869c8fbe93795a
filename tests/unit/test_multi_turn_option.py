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
