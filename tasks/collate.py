"""Batch collators for the training ranks (plain torch; no Prefect, no tokenizer captured).

Features are rows of the tokenized Dataset: `input_ids` and `labels` (-100 = not trained); other
columns (`id`, `length`) are ignored.

- `PaddedCollator`: right-pads to the longest sample of the batch (rounded up to
  `pad_to_multiple_of`), never to `max_length`. Pads get the tokenizer's pad id, label -100 and
  attention_mask 0. Which positions are padding comes from the sample lengths, never from
  comparing ids with the pad id, so an eos inside a sample is always kept as a target.
- `PackedCollator`: padding-free packing. The batch becomes one row (1, total_tokens) with
  `position_ids` restarting at 0 for every sample and no attention_mask; transformers builds a
  block-diagonal causal mask from the position_ids, so no token attends across samples. The
  first label of every sample is -100, so no sample is trained to follow the previous one.

Both count `tokens_seen` (real tokens, pads excluded) and `trained_tokens_seen` (labels != -100).

- `register_packed_attention()`: an exact attention for these batches that never builds a mask.
  transformers gives a packed row a dense (T, T) block mask under sdpa, so attention costs
  ~ (sum of lengths)^2 and the fused causal kernel cannot be used; this one runs causal sdpa on
  each sample's slice of the row (boundaries from `position_ids`), ~ sum of length^2, the CPU
  counterpart of variable-length flash attention. On right-padded batches it is plain causal sdpa:
  real tokens never see the pads that follow them, so their outputs are unchanged. Training only
  (no KV cache, no left padding). bench/bench_train.py measures it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _as_list(x: Any) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class PaddedCollator:
    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, eos_token_id: int | None = None):
        if pad_token_id is None:
            raise ValueError("PaddedCollator needs the tokenizer's pad_token_id; the tokenizer has none (add a pad token).")
        if eos_token_id is not None and pad_token_id == eos_token_id:
            # Seed 001's trap: with pad == eos the end token is indistinguishable from padding.
            raise ValueError(
                f"pad_token_id == eos_token_id ({pad_token_id}): give the tokenizer a dedicated pad token, "
                "or use batching=packed (no padding)."
            )
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokens_seen = 0
        self.trained_tokens_seen = 0

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [(_as_list(f["input_ids"]), _as_list(f["labels"])) for f in features]
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        flat_ids, flat_labels, lengths = [], [], []
        for i, (ids, labs) in enumerate(rows):
            if len(ids) != len(labs):
                raise ValueError(f"sample {i} of the batch has {len(ids)} input_ids but {len(labs)} labels")
            flat_ids += ids
            flat_labels += labs
            lengths.append(len(ids))
        # Scatter the concatenated samples into the padded grid with one boolean mask: one tensor
        # built from a flat list instead of one per row.
        attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()  # (B, T)
        real = attention_mask.bool()
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        input_ids[real] = torch.tensor(flat_ids, dtype=torch.long)
        labels[real] = torch.tensor(flat_labels, dtype=torch.long)
        self.tokens_seen += int(attention_mask.sum())
        self.trained_tokens_seen += int((labels != IGNORE_INDEX).sum())
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackedCollator:
    def __init__(self) -> None:
        self.tokens_seen = 0
        self.trained_tokens_seen = 0

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for i, f in enumerate(features):
            x, y = _as_list(f["input_ids"]), _as_list(f["labels"])
            if len(x) != len(y):
                raise ValueError(f"sample {i} of the batch has {len(x)} input_ids but {len(y)} labels")
            if not x:
                continue
            ids += x
            labels.append(IGNORE_INDEX)  # the first token of a sample has no context of its own
            labels += y[1:]
            positions += range(len(x))
        input_ids = torch.tensor([ids], dtype=torch.long)  # (1, sum of lengths)
        label_t = torch.tensor([labels], dtype=torch.long)  # (1, sum of lengths)
        position_ids = torch.tensor([positions], dtype=torch.long)  # (1, sum of lengths), 0.. per sample
        self.tokens_seen += input_ids.numel()
        self.trained_tokens_seen += int((label_t != IGNORE_INDEX).sum())
        return {"input_ids": input_ids, "labels": label_t, "position_ids": position_ids}


PACKED_ATTENTION = "ftflow_packed_sdpa"


def _segments(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Start offsets of the samples of a packed row (position_ids restart at 0), or None if one sample."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if starts[:1] != [0] or len(starts) == 1:
        return None
    return starts + [length]


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal sdpa per sample of a packed row; one causal call for an ordinary batch.

    query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D), like transformers' sdpa_attention_forward.
    """
    if attention_mask is not None:  # a caller built a mask anyway: honour it with the library's sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    cuts = _segments(kwargs.get("position_ids"), query.shape[2])
    if cuts is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                    dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa,
                )
                for a, b in zip(cuts[:-1], cuts[1:])
            ],
            dim=2,
        )
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Register `packed_sdpa_attention` with transformers; returns the `attn_implementation` name.

    No mask function is registered for it, so transformers builds no (T, T) mask at all.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    return PACKED_ATTENTION
