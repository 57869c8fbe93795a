"""The first losses of a fixed-seed tiny run equal recorded values.

The real entry point (`run_training` → torchrun → `tasks.train_worker`: tokenized cache → collator →
HF Trainer → AdamW, cosine schedule) runs one rank, with padded and with packed batches (and the chunked loss), without DeepSpeed on the embedded tiny Qwen2. A
silent change to masking, padding, packing, the data order or the optimiser moves these numbers.
If a change is intended, re-record them (the test prints the new values when it fails).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ftflow.config import TrainConfig
from tasks.tokenize import tokenize_dataset
from tasks.train import run_training

REPO = Path(__file__).resolve().parents[2]

# Recorded on CPU (torch 2.13, transformers 5.23): steps 1..5 of the run below.
EXPECTED_LOSSES = [6.379156112670898, 6.483837604522705, 6.295007705688477, 6.0414509773254395, 5.918198585510254]


@pytest.mark.parametrize("batching,loss_chunk_tokens", [("padded", 0), ("packed", 0), ("packed", 16)])
def test_first_losses_of_fixed_seed_run(tiny_model_dir, tmp_path, batching, loss_chunk_tokens):
    # Packed rows with per-sample attention must give the very losses of padded batches: the same
    # samples per step, the same trained tokens, attention never crossing samples. The chunked
    # LM-head loss (16 trained tokens a chunk) must give them too.
    rows = (REPO / "data/demo/reverse_train.jsonl").read_text().splitlines()[:40]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    tok = tokenize_dataset(tmp_path / "train.jsonl", str(tiny_model_dir), cache_root=tmp_path / "cache", max_length=64)
    train = TrainConfig(mode="full", deepspeed=None, nproc_per_node=1, max_steps=5, micro_batch_size=4,
                        learning_rate=1e-3, warmup_ratio=0.2, lr_scheduler="cosine", batching=batching,
                        group_by_length=False, loss_chunk_tokens=loss_chunk_tokens, save_steps=100, logging_steps=1, seed=11, timeout_minutes=5)
    summary = run_training(train=train, train_dir=tmp_path / "run", model_path=str(tiny_model_dir),
                           dataset_path=str(tok.path), pad_token_id=AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id)
    assert summary["loss"] == (f"chunked:{loss_chunk_tokens}" if loss_chunk_tokens else "model")
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert EXPECTED_LOSSES is not None, f"record these: {losses}"
    torch.testing.assert_close(losses, EXPECTED_LOSSES, rtol=1e-5, atol=1e-6, msg=lambda m: f"{m}\nnew losses: {losses}")
