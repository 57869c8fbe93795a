"""Property tests: any content becomes a valid sample or a clear rejection, with masks that agree
with the rendered text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tasks.templates import BUILTIN_TEMPLATES, render, trained_char_spans
from tasks.tokenize import TokenizeError, _Builder

EOS = "<|im_end|>"
REASONS = {
    "bad_row", "no_assistant_turn", "special_token_in_content", "template_error", "invalid_unicode",
    "too_long", "no_trained_tokens", "no_trained_tokens_after_truncation",
}
TRICKY = list("🙂👍🏽👨‍👩‍👧مرحباשלום\u200f\u202e\u0301\x00\x07\t\r\n a。é") + ["e\u0301", "\r\n", "  "]

any_text = st.text(max_size=40)  # any code point hypothesis likes: controls, combining marks, astral planes
tricky = st.lists(st.sampled_from(TRICKY), max_size=30).map("".join)  # emoji, RTL, joiners, controls
edge = st.sampled_from(["", " ", "\n", "[/INST]", "ab" * 400])  # empty, blank, template syntax, long
content = st.one_of(any_text, tricky, edge)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": content})
conversation = st.one_of(
    st.fixed_dictionaries({"id": st.just("x"), "messages": st.lists(message, min_size=1, max_size=6)}),
    # mostly well-formed conversations: user/assistant alternation
    st.lists(st.tuples(content, content), min_size=1, max_size=3).map(
        lambda turns: {"id": "x", "messages": [m for u, a in turns for m in (
            {"role": "user", "content": u}, {"role": "assistant", "content": a})]}),
)
row = st.one_of(conversation, conversation, st.fixed_dictionaries({"id": st.just("x"), "text": content}))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("template", sorted(BUILTIN_TEMPLATES))
@given(
    row=row,
    objective=st.sampled_from(["sft", "sft", "pretrain"]),
    train_on=st.sampled_from(["all_assistant", "last_assistant"]),
    max_length=st.one_of(st.integers(9, 64), st.integers(500, 2000)),
    policy=st.sampled_from(["drop", "truncate", "raise"]),
)
def test_any_row_is_a_valid_sample_or_a_clear_rejection(tok, row, template, objective, train_on, max_length, policy):
    tpl = BUILTIN_TEMPLATES[template]
    b = _Builder(tok, tpl, objective, train_on, max_length, policy, Path("in.jsonl"))
    try:
        b.add([(1, row)])
    except TokenizeError as err:
        assert policy == "raise" and "tokenize.max_length" in str(err)
        event("raised: too long")
        return
    samples = b.samples()
    # One sample per row, or one per assistant turn where the row's earlier replies would not keep
    # their tokens in context (tokenize.multi_turn: auto); each rejected one says why.
    assert samples or b.rejects
    for r in b.rejects:
        event(f"rejected: {r['reason']}")
        assert r["reason"] in REASONS and r["detail"] and r["line"] == 1
    if not samples:
        return
    messages = row.get("messages")
    replies = [i for i, m in enumerate(messages or []) if m["role"] == "assistant"]
    replies = replies[-1:] if train_on == "last_assistant" else replies
    if len(samples) > 1:
        event("split into one sample per turn")
        assert objective == "sft" and [s["id"] for s in samples] == [f"x#{k}" for k in range(1, len(replies) + 1)]
    for n, sample in enumerate(samples):
        ids, labels = sample["input_ids"], sample["labels"]
        event(f"sample ({objective}, {template}{', truncated' if b.truncated else ''})")
        assert len(ids) == len(labels) == b.lengths[n] == sample["length"] <= max_length
        assert labels[0] == -100 and any(lab != -100 for lab in labels)
        assert all(lab in (-100, t) for t, lab in zip(ids, labels))
        if messages is None:
            text = row["text"] + EOS
            assert ids == tok(text, add_special_tokens=False)["input_ids"][: len(ids)]
            assert labels[1:] == ids[1:]
            continue
        if objective == "pretrain":
            text, _ = trained_char_spans(tok, tpl, messages, objective, train_on)
            assert ids == tok(text, add_special_tokens=False)["input_ids"][: len(ids)]
            assert labels[1:] == ids[1:]
            continue
        turns = replies if len(samples) == 1 else [replies[n]]
        before = " " if template == "llama2" else ""
        expected = [False] * len(ids)
        for i in turns:
            # The tokens before each trained turn are exactly the inference prompt's tokens, and the
            # trained ones are the reply plus its end token, encoded on their own.
            prompt = tok(render(tok, tpl, messages[:i], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            reply = tok(before + messages[i]["content"] + EOS, add_special_tokens=False)["input_ids"]
            a, e = len(prompt), min(len(prompt) + len(reply), len(ids))
            assert ids[:a] == prompt[: len(ids)]
            if a >= len(ids):  # cut off by truncation
                continue
            assert ids[a:e] == reply[: e - a]
            expected[a:e] = [True] * max(e - a, 0)
        expected[0] = False
        assert [lab != -100 for lab in labels] == expected


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained positions."""
    runs, start = [], None
    for k, lab in enumerate(labels + [-100]):
        if lab != -100 and start is None:
            start = k
        elif lab == -100 and start is not None:
            runs.append((start, k))
            start = None
    return runs


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=content,
    reply=content,
    special=st.sampled_from([EOS, "<|im_start|>", "<|endoftext|>"]),
    where=st.integers(0, 1),
    at=st.integers(0, 50),
)
def test_special_token_text_in_content_is_rejected(tok, prompt, reply, special, where, at):
    # Written into the rendered text it would become the control token itself (prompt injection).
    texts = [prompt, reply]
    texts[where] = texts[where][:at] + special + texts[where][at:]
    row = {"id": "x", "messages": [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]}
    b = _Builder(tok, BUILTIN_TEMPLATES["chatml"], "sft", "all_assistant", 512, "drop", Path("in.jsonl"))
    b.add([(1, row)])
    assert not b.samples() and [r["reason"] for r in b.rejects] == ["special_token_in_content"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("template", ["chatml", "llama2"])
@given(row=conversation, objective=st.sampled_from(["sft", "pretrain"]))
def test_whole_text_mode_trains_the_tokens_that_overlap_the_spans(tok, template, row, objective):
    # The path for tokenizers that prepend to every text: the whole rendered text is encoded and a
    # token is trained when it overlaps a trained character span (offsets from the tokenizer).
    tpl = BUILTIN_TEMPLATES[template]
    b = _Builder(tok, tpl, objective, "all_assistant", 4096, "drop", Path("in.jsonl"))
    b.segmentwise = False
    b.add([(1, row)])
    if b.rejects:
        return
    (sample,) = b.samples()
    ids, labels = sample["input_ids"], sample["labels"]
    text, spans = trained_char_spans(tok, tpl, row["messages"], objective, "all_assistant")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        overlaps = any(s < b and e > a for a, b in spans)
        assert (labels[i] != -100) == (overlaps and i > 0), (i, s, e, spans)


def _tokenizer(pre_tokenizer=None, normalizer=None):
    from tokenizers import Tokenizer, models

    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.normalizer = pre_tokenizer, normalizer
    return t


def test_tokenizers_that_prepend_to_every_text_are_encoded_whole(tok):
    from tokenizers import normalizers, pre_tokenizers

    from tasks.tokenize import _prepends_to_each_text

    assert not _prepends_to_each_text(tok.backend_tokenizer)  # byte-level BPE (Qwen): segment-wise
    assert not _prepends_to_each_text(_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="never")))
    assert not _prepends_to_each_text(_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False)))
    # SentencePiece-style (Llama-2, Mistral), legacy Llama's normalizer, RoBERTa-style byte level:
    assert _prepends_to_each_text(_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="first")))
    assert _prepends_to_each_text(_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(), pre_tokenizers.Metaspace(prepend_scheme="always")])))
    assert _prepends_to_each_text(_tokenizer(normalizer=normalizers.Sequence([
        normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])))
    assert _prepends_to_each_text(_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True)))
