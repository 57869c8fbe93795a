"""The real Qwen2.5 vocabulary and the real Qwen2.5 / Qwen3 chat templates, for tests.

They are third-party files kept in `../shared/fixtures/tokenizers/` (beside the checkout; CI has
the folder). Nothing here is copied into the project: a test builds a tokenizer folder from them
in a temporary directory, and a tiny random-init Qwen2 on the full 151,665-token vocabulary when it
needs a model. Tests that need them skip with a clear reason where the folder is absent.

    tok_dir = real_tokenizer_dir(tmp, "qwen2.5")       # tokenizer files only
    model_dir = real_tiny_model_dir(tmp, "qwen3")      # tokenizer + Qwen2ForCausalLM (hidden 64, 2 layers)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("FTFLOW_TOKENIZER_FIXTURES", REPO.parent / "shared" / "fixtures" / "tokenizers"))
TEMPLATES = ("qwen2.5", "qwen3")


def have_fixtures() -> bool:
    return (FIXTURES / "vocab.json").is_file() and (FIXTURES / "merges.txt").is_file()


needs_real_vocab = pytest.mark.skipif(
    not have_fixtures(), reason=f"real tokenizer fixtures not found at {FIXTURES} (../shared/fixtures/tokenizers)"
)


def build_real_tokenizer(kind: str = "qwen2.5"):
    """A `Qwen2TokenizerFast` on the real vocabulary with `kind`'s added tokens and chat template."""
    from transformers import AddedToken, Qwen2TokenizerFast

    if kind not in TEMPLATES:
        raise ValueError(f"kind must be one of {TEMPLATES}")
    if not have_fixtures():
        pytest.skip(f"real tokenizer fixtures not found at {FIXTURES}")
    config = json.loads((FIXTURES / kind / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = Qwen2TokenizerFast(
        vocab=str(FIXTURES / "vocab.json"), merges=str(FIXTURES / "merges.txt"),
        unk_token=None, bos_token=None, eos_token=None, pad_token=None, clean_up_tokenization_spaces=False,
    )
    decoder = sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
    for i, spec in decoder:
        token = AddedToken(spec["content"], special=spec["special"], normalized=spec["normalized"],
                           lstrip=spec["lstrip"], rstrip=spec["rstrip"], single_word=spec["single_word"])
        tok.add_tokens([token], special_tokens=spec["special"])
        assert tok.convert_tokens_to_ids(spec["content"]) == int(i), (spec["content"], i)
    tok.eos_token = config["eos_token"]
    tok.pad_token = config["pad_token"]
    tok.chat_template = (FIXTURES / kind / "chat_template.jinja").read_text(encoding="utf-8")
    return tok


def real_tokenizer_dir(root: str | Path, kind: str = "qwen2.5") -> Path:
    """`root/<kind>-tokenizer`: the real tokenizer saved as a model folder would hold it."""
    out = Path(root) / f"{kind}-tokenizer"
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        build_real_tokenizer(kind).save_pretrained(out)
    return out


def real_tiny_model_dir(root: str | Path, kind: str = "qwen2.5", hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """`root/<kind>-tiny`: the real tokenizer and a random-init Qwen2ForCausalLM on its whole vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(root) / f"{kind}-tiny"
    if (out / "config.json").is_file():
        return out
    tok = build_real_tokenizer(kind)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
