"""Property tests: any content becomes a valid sample or a clear rejection, with masks that agree
with the rendered text."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tasks.templates import BUILTIN_TEMPLATES, trained_char_spans
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
    assert len(samples) + len(b.rejects) == 1
    if b.rejects:
        r = b.rejects[0]
        event(f"rejected: {r['reason']}")
        assert r["reason"] in REASONS and r["detail"] and r["line"] == 1
        return

    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    event(f"sample ({objective}, {template}{', truncated' if b.truncated else ''})")
    assert len(ids) == len(labels) == b.lengths[0] == samples[0]["length"] <= max_length
    assert labels[0] == -100 and any(lab != -100 for lab in labels)
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))

    # The rendered text: its tokens are the sample (cut at max_length under truncate).
    messages = row.get("messages")
    if messages is None:
        text, spans = row["text"] + EOS, None
    else:
        text, spans = trained_char_spans(tok, tpl, messages, objective, train_on)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"][: len(ids)] == ids
    assert tok.decode(enc["input_ids"], skip_special_tokens=False) == unicodedata.normalize("NFC", text)

    if objective == "pretrain":
        assert labels[1:] == ids[1:]
        return
    # Trained spans are exactly each (selected) reply plus its end token, found in the text...
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    replies = replies[-1:] if train_on == "last_assistant" else replies
    before = " " if template == "llama2" else ""
    assert [text[a:b] for a, b in spans] == [before + c + EOS for c in replies]
    # ... and a token is trained exactly when it overlaps one of them.
    for i, (s, e) in enumerate(enc["offset_mapping"][: len(ids)]):
        overlaps = any(s < b and e > a for a, b in spans)
        assert (labels[i] != -100) == (overlaps and i > 0), (i, s, e, spans)


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
@given(rows=st.lists(conversation, min_size=1, max_size=8), objective=st.sampled_from(["sft", "pretrain"]))
def test_byte_length_offsets_equal_the_tokenizers_offsets(tok, template, rows, objective):
    # The fast path (offsets from token byte lengths, `encode_batch_fast`) against the tokenizer's
    # own offsets (`encode_batch`) on the same chunk: identical samples, labels and rejects.
    def build(fast: bool) -> _Builder:
        b = _Builder(tok, BUILTIN_TEMPLATES[template], objective, "all_assistant", 4096, "drop", Path("in.jsonl"))
        if not fast:
            b.byte_lengths = None
        b.add(list(enumerate(rows, 1)))
        return b

    fast, slow = build(True), build(False)
    assert fast.byte_lengths is not None
    assert fast.samples() == slow.samples()
    assert fast.rejects == slow.rejects and fast.trained == slow.trained
    rendered = []
    for r in rows:
        try:
            rendered.append(fast._prepare(r)[0])
        except Exception:  # rejected rows (counted above, alike in both)
            continue
    if any(not unicodedata.is_normalized("NFC", t) for t in rendered):
        event("a non-NFC text took the offsets fallback")
        assert fast.offset_fallbacks > 0


def test_byte_length_table_is_refused_for_non_byte_level_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tasks.tokenize import _token_byte_lengths

    wordlevel = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    assert _token_byte_lengths(wordlevel) is None
