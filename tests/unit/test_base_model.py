"""The embedded default model: deterministic (byte-identical builds), pad != eos, ChatML template."""

from __future__ import annotations

import json

from ftflow.utils import sha256_file
from tasks.base_model import build_tiny_qwen2


def test_build_is_byte_identical(tmp_path, tiny_model_dir):
    build_tiny_qwen2(tmp_path)
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert sha256_file(tmp_path / name) == sha256_file(tiny_model_dir / name), name


def test_tokenizer_has_chatml_tokens_and_distinct_pad(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_generation_config_stops_at_end_of_turn(tiny_model_dir):
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["eos_token_id"] in gen["eos_token_id"] and gen["pad_token_id"] == cfg["pad_token_id"]
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]


def test_committed_demo_data_matches_generator(tmp_path, demo_dir):
    from ftflow.demo import write_demo_data

    write_demo_data(tmp_path)
    for f in ("poems.json", "reverse_train.jsonl", "reverse_eval.jsonl"):
        assert (tmp_path / f).read_bytes() == (demo_dir / f).read_bytes(), f
    train = {json.loads(line)["messages"][0]["content"] for line in (demo_dir / "reverse_train.jsonl").open()}
    held_out = {json.loads(line)["messages"][0]["content"] for line in (demo_dir / "reverse_eval.jsonl").open()}
    assert not train & held_out
