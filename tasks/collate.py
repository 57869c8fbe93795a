"""Batch collators for the training ranks (plain torch; no Prefect, no tokenizer captured).

Features are rows of the tokenized Dataset: `input_ids` and `labels` (-100 = not trained); other
columns (`id`, `length`) are ignored.

- `PaddedCollator`: right-pads to the longest sample of the batch (rounded up to
  `pad_to_multiple_of`), never to `max_length`. Pads get the tokenizer's pad id, label -100 and
  attention_mask 0. Which positions are padding comes from the sample lengths, never from
  comparing ids with the pad id, so an eos inside a sample is always kept as a target.
- `PackedCollator`: padding-free packing. The batch becomes one row (1, total_tokens) with
  `position_ids` restarting at 0 for every sample and no attention_mask. The first label of every
  sample is -100, so no sample is trained to follow the previous one. The samples' boundaries travel
  with the batch, computed once on the host, with the names and types of transformers'
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`: `cu_seq_lens_q/k` (int32 (n + 1,)
  cumulative lengths) and `max_length_q/k` (Python ints). The model passes them down to every
  attention layer, so variable-length flash attention needs no `(position_ids == 0).nonzero()`
  (a device-to-host sync) in any layer.
- `pack_by_tokens` / `balanced_bin_order` / `TokenBudgetBins`: `train.tokens_per_batch`, packing to
  a token budget (best-fit decreasing; every sample once, never split) with the bins ordered so the
  ranks of one step get bins of about the same size.

Both count `tokens_seen` (real tokens, pads excluded) and `trained_tokens_seen` (labels != -100).

- `register_packed_attention()`: an exact attention for these batches that never builds a mask.
  transformers gives a packed row a dense (T, T) block mask under sdpa, so attention costs
  ~ (sum of lengths)^2 and the fused causal kernel cannot be used; this one takes the collator's
  boundaries and runs, on CUDA, torch's variable-length flash kernel
  (`torch.nn.attention.varlen.varlen_attn`, one call for the whole row) where torch has it, and
  otherwise causal sdpa on each sample's slice of the row (boundaries as Python ints, converted once
  per batch), ~ sum of length^2. On right-padded batches it is plain causal sdpa: real tokens never
  see the pads that follow them, so their outputs are unchanged. Training only (no KV cache, no left
  padding). bench/bench_train.py measures it on CPU, bench/gpu.py on a GPU.
"""

from __future__ import annotations

import math
import random
import weakref
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

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        if len(features) == 1 and isinstance(features[0], list):
            features = features[0]  # one bin of `TokenBudgetBins` (the DataLoader batches 1 bin)
        ids, labels, positions = [], [], []
        cu_seq_lens, max_length = [0], 0
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
            cu_seq_lens.append(cu_seq_lens[-1] + len(x))
            max_length = max(max_length, len(x))
        input_ids = torch.tensor([ids], dtype=torch.long)  # (1, sum of lengths)
        label_t = torch.tensor([labels], dtype=torch.long)  # (1, sum of lengths)
        position_ids = torch.tensor([positions], dtype=torch.long)  # (1, sum of lengths), 0.. per sample
        self.tokens_seen += input_ids.numel()
        self.trained_tokens_seen += int((label_t != IGNORE_INDEX).sum())
        cu = torch.tensor(cu_seq_lens, dtype=torch.int32)  # (n + 1,): sample i is [cu[i], cu[i+1])
        return {
            "input_ids": input_ids, "labels": label_t, "position_ids": position_ids,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_length, "max_length_k": max_length,
        }


# ------------------------------------------------------------------------------ token-budget bins


def pack_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into bins of at most `budget` tokens.

    Every index appears in exactly one bin and no sample is split; a sample longer than the budget
    gets a bin of its own (config validation keeps `tokens_per_batch >= tokenize.max_length`, so
    it does not happen in a run). Samples are placed longest first, each into the fullest bin it
    still fits (ties: the earliest bin), else into a new bin; O(n log n) with a sorted list of
    remaining capacities. Deterministic: equal lengths keep their index order.
    """
    import bisect

    if budget < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin number), sorted
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))  # the smallest remaining capacity that still holds n
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (cap - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (budget - n, len(bins) - 1))
    return bins


def split_to_multiple(bins: list[list[int]], lengths: Sequence[int], world: int) -> list[list[int]]:
    """Split bins until their number is a multiple of `world`, so every rank gets the same number
    of bins a epoch (else the data loader would hand some ranks a repeated bin). The bin with the
    most tokens among those with two or more samples is split in two balanced halves; stops when
    no bin can be split (fewer samples than ranks)."""
    bins = [list(b) for b in bins]
    while world > 1 and len(bins) % world:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(big)
        halves: list[list[int]] = [[], []]
        for i in sorted(big, key=lambda i: -lengths[i]):  # greedy: the next sample to the lighter half
            min(halves, key=lambda h: sum(lengths[j] for j in h)).append(i)
        bins += halves
    return bins


def balanced_bin_order(bins: list[list[int]], lengths: Sequence[int], world: int, seed: int) -> list[list[int]]:
    """The bins in the order the data loader hands them out: consecutive groups of `world` bins are
    one step (accelerate gives bin k of a group to rank k), so bins are sorted by tokens and cut
    into groups of similar size, and the groups (not the bins inside them) are shuffled by `seed`.
    Every rank thus gets about the same tokens every step and waits little for the others."""
    world = max(1, world)
    by_size = sorted(bins, key=lambda b: (-sum(lengths[i] for i in b), b[0]))
    groups = [by_size[a:a + world] for a in range(0, len(by_size), world)]
    random.Random(seed).shuffle(groups)
    return [b for g in groups for b in g]


class TokenBudgetBins(torch.utils.data.Dataset):
    """The tokenized dataset seen as bins of at most `budget` tokens: item k is the list of the
    features of bin k (`PackedCollator` flattens it; the DataLoader's batch size is 1). The bins
    are fixed; their order is reshuffled each epoch (`set_epoch`, called by accelerate's loader)."""

    def __init__(self, dataset, budget: int, world: int, seed: int, lengths: Sequence[int] | None = None):
        self.dataset = dataset
        self.lengths = list(lengths if lengths is not None else dataset["length"])
        self.world, self.seed = max(1, world), seed
        self.bins = split_to_multiple(pack_by_tokens(self.lengths, budget), self.lengths, self.world)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = balanced_bin_order(self.bins, self.lengths, self.world, self.seed + epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> list[dict]:
        return [self.dataset[int(i)] for i in self.order[k]]


# ------------------------------------------------------------------------------------- attention

PACKED_ATTENTION = "ftflow_packed_sdpa"

try:  # torch >= 2.10: variable-length flash attention in torch itself (CUDA), with autograd and GQA
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch
    _torch_varlen_attn = None

_host_cuts: tuple[Any, list[int]] | None = None  # (weakref to the batch's cu_seq_lens, its values)


def _host_boundaries(cu_seq_lens: torch.Tensor) -> list[int]:
    """The collator's boundaries as Python ints, converted once per batch (the first layer) and
    reused by every other layer and by the backward recompute: the same tensor object is the same
    batch. On a GPU that is one copy to the host per batch, not one per layer."""
    global _host_cuts
    if _host_cuts is not None and _host_cuts[0]() is cu_seq_lens:
        return _host_cuts[1]
    cuts = [int(x) for x in cu_seq_lens.tolist()]
    _host_cuts = (weakref.ref(cu_seq_lens), cuts)
    return cuts


def _varlen_kernel_fits(query: torch.Tensor, dropout: float) -> bool:
    """torch's varlen flash kernel: CUDA, bf16/fp16, no dropout (it has none)."""
    return (_torch_varlen_attn is not None and query.is_cuda and dropout == 0.0
            and query.dtype in (torch.float16, torch.bfloat16))


def _segments(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Start offsets of the samples of a packed row (position_ids restart at 0), or None if one sample.
    Only for callers that pass no `cu_seq_lens_q` (e.g. a test calling the model by hand): it reads
    the position ids back to the host."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if starts[:1] != [0] or len(starts) == 1:
        return None
    return starts + [length]


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention per sample of a packed row; one causal call for an ordinary batch.

    query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D), like transformers' sdpa_attention_forward.
    Boundaries: the collator's `cu_seq_lens_q` (and `max_length_q`), else read from `position_ids`.
    """
    if attention_mask is not None:  # a caller built a mask anyway: honour it with the library's sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    packed_row = query.shape[0] == 1 and cu is not None and cu.numel() > 2
    if packed_row and _varlen_kernel_fits(query, dropout):
        # One varlen flash call over the whole row: (T, H, D) in, (T, H, D) out, no host sync.
        out = _torch_varlen_attn(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu.to(device=query.device, dtype=torch.int32), cu.to(device=query.device, dtype=torch.int32),
            int(kwargs["max_length_q"]), int(kwargs["max_length_q"]),
            scale=scaling, window_size=(-1, 0), enable_gqa=gqa,
        )
        return out.unsqueeze(0), None  # (1, T, H, D)
    if packed_row:
        cuts = _host_boundaries(cu)
    elif cu is None:
        cuts = _segments(kwargs.get("position_ids"), query.shape[2])
    else:
        cuts = None  # one sample
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
