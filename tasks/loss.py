"""Causal-LM loss without materialising every logit (`train.loss_chunk_tokens`).

transformers' `ForCausalLMLoss` computes the LM head on every position at once and upcasts the
(tokens, vocab) logits to fp32: with Qwen's 151,936-token vocabulary that is 0.6 MB a token, so a
16k-token micro-batch needs ~10 GB for the logits alone, and as much again for their gradient.
Here the head and the cross-entropy run on a chunk of positions at a time under activation
checkpointing, so no chunk's logits outlive it; positions without a target (prompt tokens, the
first token of each packed sample) never reach the head at all. Same loss and gradients as the
library's (tests compare them); the price is a second forward of the head per chunk, which the
skipped prompt positions more than pay for. Measured (bench/bench_kernels.py, Qwen2.5-0.5B head,
2,048 tokens, a third prompt): 0.46x the peak memory at 1.11-1.19x the speed of the library's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tasks.collate import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (c, V): lives only inside this chunk (recomputed for backward)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels`, `chunk_tokens` targets at a time.

    hidden: (B, T, H) final hidden states (after the model's last norm); labels: (B, T), -100 where
    nothing is trained. Like transformers' ForCausalLMLoss: position t predicts labels[t + 1], the
    sum is divided by `num_items_in_batch` when given (the Trainer's count over the accumulated
    batch), else by the number of targets.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)  # (B*T,)
    keep = targets != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, H): only positions with a target
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, targets.numel(), chunk_tokens):
        total = total + checkpoint(_chunk_loss, h[a:a + chunk_tokens], targets[a:a + chunk_tokens], head,
                                   use_reentrant=False)
    if num_items_in_batch is None:
        return total / max(targets.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
