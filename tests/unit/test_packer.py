"""Token-budget packing (`train.tokens_per_batch`): properties over random length lists (hypothesis)
and literal cases checked by hand."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.collate import PackedCollator, TokenBudgetBins, balanced_bin_order, pack_by_tokens, split_to_multiple

lengths_st = st.lists(st.integers(min_value=1, max_value=512), min_size=0, max_size=300)
budget_st = st.integers(min_value=512, max_value=4096)


def tokens(b, lengths):
    return sum(lengths[i] for i in b)


@settings(max_examples=200, deadline=None)
@given(lengths_st, budget_st)
def test_every_sample_once_never_over_budget(lengths, budget):
    bins = pack_by_tokens(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each sample exactly once
    assert all(b for b in bins)
    assert all(tokens(b, lengths) <= budget for b in bins)  # samples <= budget, never split


@settings(max_examples=200, deadline=None)
@given(lengths_st, budget_st)
def test_best_fit_decreasing_bounds(lengths, budget):
    """No two bins could be merged (a best-fit packing never leaves two bins whose contents fit in
    one), hence every bin but one is more than half full: bins < 2 x total / budget + 1."""
    bins = pack_by_tokens(lengths, budget)
    sizes = sorted(tokens(b, lengths) for b in bins)
    if len(sizes) >= 2:
        assert sizes[0] + sizes[1] > budget
    assert len(bins) < 2 * sum(lengths) / budget + 1


def test_best_fit_literal():
    # By hand, longest first, budget 10: 7 opens bin0 (3 free); 5 does not fit there, opens bin1 (5 free);
    # 4 fits only bin1 (1 free left); 3 fits bin0 exactly; 1 fits bin1 exactly.
    assert pack_by_tokens([3, 7, 1, 5, 4], 10) == [[1, 0], [3, 4, 2]]
    assert pack_by_tokens([12, 2], 10) == [[0], [1]]  # an oversize sample gets its own bin, unsplit
    assert pack_by_tokens([], 10) == []


@settings(max_examples=200, deadline=None)
@given(lengths_st, budget_st, st.integers(min_value=1, max_value=8), st.integers(0, 1000))
def test_ranks_get_the_same_bin_count_and_balanced_steps(lengths, budget, world, seed):
    bins = split_to_multiple(pack_by_tokens(lengths, budget), lengths, world)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    # a multiple of the ranks, unless no bin has two samples left to split (e.g. 4 samples, 3 ranks)
    assert len(bins) % world == 0 or all(len(b) == 1 for b in bins)
    order = balanced_bin_order(bins, lengths, world, seed)
    assert sorted(map(tuple, order)) == sorted(map(tuple, bins))  # a permutation of the bins
    # Steps are groups of `world` consecutive bins of neighbouring sizes: the spread inside a step is
    # at most the spread between neighbours in the size order, so the sum of the spreads over all
    # steps is at most the largest minus the smallest bin.
    if order:
        sizes = [tokens(b, lengths) for b in order]
        spread = sum(max(sizes[a:a + world]) - min(sizes[a:a + world]) for a in range(0, len(sizes), world))
        assert spread <= max(sizes) - min(sizes)


def test_balanced_order_literal():
    lengths = [10, 9, 5, 4, 1, 1]
    bins = [[0], [1], [2], [3], [4], [5]]
    order = balanced_bin_order(bins, lengths, world=2, seed=0)
    steps = [sorted(order[a:a + 2]) for a in range(0, 6, 2)]
    assert sorted(steps) == [[[0], [1]], [[2], [3]], [[4], [5]]]  # 10 with 9, 5 with 4, 1 with 1
    assert balanced_bin_order(bins, lengths, 2, 0) == order  # deterministic per seed
    assert {tuple(map(tuple, balanced_bin_order(bins, lengths, 2, s))) for s in range(20)} != {tuple(map(tuple, order))}


def test_dataset_of_bins_feeds_the_packed_collator():
    rows = [{"input_ids": list(range(n)), "labels": list(range(n)), "length": n} for n in (5, 3, 8, 2, 6, 1)]
    ds = TokenBudgetBins(rows, budget=8, world=2, seed=1, lengths=[r["length"] for r in rows])
    assert len(ds) % 2 == 0
    seen = Counter()
    c = PackedCollator()
    for k in range(len(ds)):
        batch = c([ds[k]])  # what a DataLoader with batch_size=1 hands the collator
        n = batch["input_ids"].shape[1]
        assert n <= 8
        assert batch["cu_seq_lens_q"].tolist()[-1] == n
        seen.update(len(f["input_ids"]) for f in ds[k])
    assert seen == Counter([5, 3, 8, 2, 6, 1])
    first = list(ds.order)
    ds.set_epoch(1)
    assert sorted(map(tuple, ds.order)) == sorted(map(tuple, first))


def test_config_refuses_a_budget_that_would_split_samples():
    import pytest

    from ftflow.config import ConfigError, validate

    base = {"data": {"train": ["x.jsonl"]}, "tokenize": {"max_length": 1024}}
    assert validate({**base, "train": {"tokens_per_batch": 1024}}).train.tokens_per_batch == 1024
    with pytest.raises(ConfigError, match=r"tokens_per_batch=512 is below tokenize.max_length=1024"):
        validate({**base, "train": {"tokens_per_batch": 512}})
    with pytest.raises(ConfigError, match=r"set train.batching=packed"):
        validate({**base, "train": {"tokens_per_batch": 2048, "batching": "padded"}})


def test_accelerate_hands_rank_k_the_kth_bin_of_each_step():
    """What `balanced_bin_order` relies on: with batch size 1 and sequential sampling (the worker's
    settings for tokens_per_batch), accelerate's sharding gives rank k bins k, k + world, ..."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    order = list(range(12))
    for world in (2, 3, 4):
        for rank in range(world):
            shard = BatchSamplerShard(BatchSampler(SequentialSampler(order), 1, False), num_processes=world,
                                      process_index=rank)
            assert [b[0] for b in shard] == order[rank::world]


def test_deepspeed_counts_one_bin_per_micro_batch():
    import json
    from pathlib import Path

    from ftflow.config import TrainConfig
    from tasks.train_worker import fill_deepspeed_config, micro_batch_size

    ds = json.loads((Path(__file__).resolve().parents[2] / "configs/deepspeed/zero3.json").read_text())
    t = TrainConfig(micro_batch_size=4, grad_accum=3, tokens_per_batch=2048).model_dump()
    filled = fill_deepspeed_config(ds, t, world=2)
    assert micro_batch_size(t) == 1 and filled["train_micro_batch_size_per_gpu"] == 1
    assert filled["train_batch_size"] == 1 * 3 * 2  # bins a step: the Trainer's batch size must match it
