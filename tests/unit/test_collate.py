"""Collators: literal tensors, and exactness of packed / padded batches against one-by-one runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import load_from_disk
from transformers import Qwen2ForCausalLM

from tasks import collate
from tasks.collate import PackedCollator, PaddedCollator, register_packed_attention
from tasks.tokenize import tokenize_dataset

PAD, EOS = 0, 2  # the embedded tokenizer's <|endoftext|> and <|im_end|>

A = {"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS], "id": "a", "length": 4}
B = {"input_ids": [8, 9], "labels": [-100, 9], "id": "b", "length": 2}


def test_padded_literal():
    c = PaddedCollator(pad_token_id=PAD, eos_token_id=EOS)
    out = c([A, B])
    assert out["input_ids"].tolist() == [[5, 6, 7, EOS], [8, 9, PAD, PAD]]
    assert out["labels"].tolist() == [[-100, -100, 7, EOS], [-100, 9, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(v.dtype == torch.long for v in out.values())
    assert (c.tokens_seen, c.trained_tokens_seen) == (6, 3)


def test_padded_to_multiple_and_padding_never_hides_eos():
    # A sample that ends with a token equal to the pad id must keep it: padding is known by length.
    C = {"input_ids": [3, PAD, EOS], "labels": [-100, PAD, EOS]}
    out = PaddedCollator(PAD, pad_to_multiple_of=8)([A, C])
    assert out["input_ids"].shape == (2, 8)
    assert out["labels"][1].tolist() == [-100, PAD, EOS] + [-100] * 5
    assert out["labels"][0, 3].item() == EOS


def test_pad_equal_eos_is_refused():
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        PaddedCollator(pad_token_id=EOS, eos_token_id=EOS)


def test_packed_literal():
    c = PackedCollator()
    out = c([A, B])
    assert set(out) == {"input_ids", "labels", "position_ids",  # no attention_mask
                        "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert out["cu_seq_lens_q"].tolist() == [0, 4, 6] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 4 and type(out["max_length_q"]) is int
    assert out["input_ids"].tolist() == [[5, 6, 7, EOS, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert out["labels"].tolist() == [[-100, -100, 7, EOS, -100, 9]]
    # Even a sample whose first label is set does not get trained to follow the previous sample.
    out = c([A, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert out["labels"].tolist() == [[-100, -100, 7, EOS, -100, 9]]
    assert (c.tokens_seen, c.trained_tokens_seen) == (12, 6)


# --------------------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def features(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collate")
    msgs = [
        [{"role": "user", "content": "Reverse the words: apple river stone"},
         {"role": "assistant", "content": "stone river apple"}],
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Reverse the words: tiger lemon"}, {"role": "assistant", "content": "lemon tiger"},
         {"role": "user", "content": "Reverse the words: cloud piano rocket"},
         {"role": "assistant", "content": "rocket piano cloud"}],
        [{"role": "user", "content": "请你给敖丙写一首诗：碧海生龙子，云中舞雪霜。"},
         {"role": "assistant", "content": "恩仇难两忘，何处是家乡？"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello 🙂"}],
    ]
    with open(tmp / "in.jsonl", "w", encoding="utf-8") as f:
        for i, m in enumerate(msgs):
            f.write(json.dumps({"id": str(i), "messages": m, "source": "t"}, ensure_ascii=False) + "\n")
    result = tokenize_dataset(tmp / "in.jsonl", str(tiny_model_dir), cache_root=tmp / "cache")
    feats = list(load_from_disk(str(result.path)))
    assert len({len(f["input_ids"]) for f in feats}) > 1  # mixed lengths, so padding is exercised
    return feats


def model(tiny_model_dir, attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    m = Qwen2ForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
    return m.eval()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t + 1] from position t. (T - 1,)"""
    return F.cross_entropy(logits[:-1].float(), labels[1:], reduction="none", ignore_index=-100)


def one_by_one(m, feats) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for f in feats:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
            losses = token_losses(m(input_ids=ids, use_cache=False).logits[0], labels)
            out.append(losses.sum() / (labels[1:] != -100).sum())
    return out


def packed_losses(m, feats, with_position_ids: bool = True) -> list[torch.Tensor]:
    batch = PackedCollator()(feats)
    kwargs = {"position_ids": batch["position_ids"]} if with_position_ids else {}
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[0]  # (T, V)
    losses, labels = token_losses(logits, batch["labels"][0]), batch["labels"][0]
    out, start = [], 0
    for f in feats:
        n = len(f["input_ids"])
        seg = slice(start, start + n - 1)  # positions predicting this sample's own tokens 1..n-1
        trained = labels[start + 1 : start + n] != -100
        out.append(losses[seg][trained].sum() / trained.sum())
        start += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_one_by_one(tiny_model_dir, features, attn):
    m = model(tiny_model_dir, attn)
    single, packed = one_by_one(m, features), packed_losses(m, features)
    torch.testing.assert_close(torch.stack(packed), torch.stack(single), rtol=0, atol=1e-5)
    # The check has teeth: without position_ids the samples attend to each other and losses move.
    leaky = packed_losses(m, features, with_position_ids=False)
    assert (torch.stack(leaky) - torch.stack(single)).abs().max() > 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_losses_equal_one_by_one(tiny_model_dir, features, attn):
    m = model(tiny_model_dir, attn)
    single = one_by_one(m, features)
    batch = PaddedCollator(pad_token_id=PAD, eos_token_id=EOS, pad_to_multiple_of=8)(features)
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    padded = []
    for i in range(len(features)):
        labels = batch["labels"][i]
        padded.append(token_losses(logits[i], labels).sum() / (labels[1:] != -100).sum())
    torch.testing.assert_close(torch.stack(padded), torch.stack(single), rtol=0, atol=1e-5)


def test_collators_count_what_the_loss_sees(features):
    padded, packed = PaddedCollator(PAD), PackedCollator()
    padded(features)
    packed(features)
    trained = sum(sum(1 for x in f["labels"] if x != -100) for f in features)
    assert padded.tokens_seen == packed.tokens_seen == sum(len(f["input_ids"]) for f in features)
    assert padded.trained_tokens_seen == packed.trained_tokens_seen == trained
    # Each sample's closing eos is a target in both layouts.
    for batch in (padded(features), packed(features)):
        assert int((batch["labels"] == EOS).sum()) == sum(f["labels"].count(EOS) for f in features) > 0


# ------------------------------------------------------------------------- boundaries in the batch


@pytest.mark.parametrize("lengths", [[4, 2], [1], [7, 1, 1, 3, 12], [3] * 9])
def test_packed_boundaries_equal_transformers(lengths):
    """The collator's kwargs are what transformers derives from the position_ids
    (`prepare_fa_kwargs_from_position_ids`, the flash path's fallback) and what its own
    `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` returns: values, dtypes, types."""
    from transformers import DataCollatorWithFlattening
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    feats = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in lengths]
    ours = PackedCollator()(feats)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(ours["position_ids"])
    assert torch.equal(ours["cu_seq_lens_q"], cu_q) and torch.equal(ours["cu_seq_lens_k"], cu_k)
    assert ours["cu_seq_lens_q"].dtype == cu_q.dtype == torch.int32
    assert ours["max_length_q"] == int(max_q) and ours["max_length_k"] == int(max_k)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype, k
    assert (ours["max_length_q"], ours["max_length_k"]) == (theirs["max_length_q"], theirs["max_length_k"])


def test_packed_attention_uses_the_batch_boundaries_without_reading_positions(tiny_model_dir, features, monkeypatch):
    """With the collator's kwargs the attention never looks at position_ids (no per-layer sync);
    the boundaries are turned into Python ints once per batch, and the losses stay exact."""
    m = model(tiny_model_dir, register_packed_attention())
    single = one_by_one(m, features)

    def no_position_scan(*a, **k):
        raise AssertionError("attention read the boundaries from position_ids")

    monkeypatch.setattr(collate, "_segments", no_position_scan)
    conversions = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: conversions.append(t.shape) or real_tolist(t))
    batch = PackedCollator()(features)
    conversions.clear()
    with torch.no_grad():
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
    assert conversions.count(batch["cu_seq_lens_q"].shape) == 1  # once, not once per layer
    labels, out, start = batch["labels"][0], [], 0
    losses = token_losses(logits, labels)
    for f in features:
        n = len(f["input_ids"])
        trained = labels[start + 1: start + n] != -100
        out.append(losses[start:start + n - 1][trained].sum() / trained.sum())
        start += n
    torch.testing.assert_close(torch.stack(out), torch.stack(single), rtol=0, atol=1e-5)


# --------------------------------------------------------------------- attention dispatch per device


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine: CUDA or not, which flash-attn packages, liger or not."""
    from tasks import train_worker

    def set_(cuda: bool, fa3: bool = False, fa2: bool = False, liger: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(train_worker, "flash_attention_available",
                            lambda: {"flash_attention_3": fa3 and cuda, "flash_attention_2": fa2 and cuda})
        monkeypatch.setattr("transformers.utils.is_liger_kernel_available", lambda: liger)
        return train_worker

    return set_


@pytest.mark.parametrize("cuda,fa3,fa2,batching,precision,expected", [
    (False, False, False, "packed", "fp32", ("ftflow_packed_sdpa", "per-sample causal sdpa")),
    (False, False, False, "padded", "fp32", ("sdpa", "sdpa")),
    (True, True, True, "packed", "bf16", ("flash_attention_3", "flash_attention_3 varlen")),
    (True, False, True, "packed", "bf16", ("flash_attention_2", "flash_attention_2 varlen")),
    (True, False, True, "padded", "bf16", ("flash_attention_2", "flash_attention_2")),
    (True, False, False, "packed", "bf16", ("ftflow_packed_sdpa", "torch varlen_attn (flash)")),
    (True, False, False, "padded", "bf16", ("sdpa", "sdpa")),
    (True, False, True, "packed", "fp32", ("ftflow_packed_sdpa", "per-sample causal sdpa")),  # flash needs bf16/fp16
])
def test_auto_attention_per_device(machine, cuda, fa3, fa2, batching, precision, expected):
    worker = machine(cuda, fa3, fa2)
    assert worker.choose_attention("auto", batching, precision) == expected


def test_explicit_flash_attention_fails_clearly_where_it_cannot_run(machine):
    worker = machine(cuda=False)
    with pytest.raises(RuntimeError, match=r"train.attn_implementation=flash_attention_2.*no CUDA device.*auto"):
        worker.choose_attention("flash_attention_2", "packed")
    worker = machine(cuda=True)
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        worker.choose_attention("flash_attention_3", "packed")
    assert worker.choose_attention("flex_attention", "packed") == ("flex_attention", "flex_attention")


def test_optimizer_and_liger_per_device(machine):
    worker = machine(cuda=False, liger=True)
    assert worker.choose_optimizer() == "adamw_torch"
    assert worker.choose_liger("auto", 3, 0) is None  # no CUDA: chunked loss is the CPU path
    with pytest.raises(RuntimeError, match="train.liger=true.*no CUDA device"):
        worker.choose_liger(True, 2, 0)
    worker = machine(cuda=True, liger=False)
    assert worker.choose_optimizer() == "adamw_torch_fused"
    assert worker.choose_liger("auto", 2, 0) is None
    with pytest.raises(RuntimeError, match="not installed"):
        worker.choose_liger(True, 2, 0)
    worker = machine(cuda=True, liger=True)
    assert worker.choose_liger("auto", 2, 0)["fused_linear_cross_entropy"] is True
    assert worker.choose_liger("auto", 3, 0)["fused_linear_cross_entropy"] is False  # reads a ZeRO-3 partition
    assert worker.choose_liger("auto", None, 1024)["fused_linear_cross_entropy"] is False  # chunked loss instead
    assert worker.choose_liger(False, 2, 0) is None


def test_varlen_branch_passes_the_kernel_the_right_layout(tiny_model_dir, features, monkeypatch):
    """The CUDA branch (torch's varlen flash kernel) cannot run here, so a stand-in with the kernel's
    documented contract takes its place: (T, H, D) q and (T, H_kv, D) k/v, cu_seq_q/k int32 (n + 1,),
    max lengths as ints, window_size=(-1, 0) for causal, enable_gqa; returns (T, H, D). Computed by
    per-sample sdpa from those arguments only, it must give the one-by-one losses through the
    branch's transposes."""
    calls = []

    def varlen_standin(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert q.dim() == 3 and k.shape[1] < q.shape[1] and enable_gqa
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and isinstance(max_q, int)
        assert window_size == (-1, 0) and max_q == int(cu_q.diff().max())
        calls.append(len(cu_q) - 1)
        cuts = cu_q.tolist()
        outs = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                               is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
                for a, b in zip(cuts[:-1], cuts[1:])]
        return torch.cat(outs)  # (T, H, D)

    monkeypatch.setattr(collate, "_torch_varlen_attn", varlen_standin)
    monkeypatch.setattr(collate, "_varlen_kernel_fits", lambda q, dropout: True)
    m = model(tiny_model_dir, register_packed_attention())
    single = one_by_one(m, features)
    batch = PackedCollator()(features)
    with torch.no_grad():
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
    assert calls and set(calls) == {len(features)}  # every layer went through the varlen branch
    labels, out, start = batch["labels"][0], [], 0
    losses = token_losses(logits, labels)
    for f in features:
        n = len(f["input_ids"])
        trained = labels[start + 1: start + n] != -100
        out.append(losses[start:start + n - 1][trained].sum() / trained.sum())
        start += n
    torch.testing.assert_close(torch.stack(out), torch.stack(single), rtol=0, atol=1e-5)
