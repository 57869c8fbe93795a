"""Masks on the real Qwen2.5 and Qwen3 chat templates and vocabulary, against an independent reference.

The reference below uses only plain `jinja2` (rendering) and the `tokenizers` library (a BPE built
here from the published vocab.json / merges.txt and Qwen's pre-tokenizer regex): no ftflow code and
not transformers' `apply_chat_template`. It states what a sample must be:

- every trained assistant turn is preceded by exactly the tokens of the prompt inference sends for
  it, `encode(render(messages[:i], add_generation_prompt=True))`, and its trained tokens are the
  turn's text from there up to and including `<|im_end|>`, encoded on their own;
- a conversation stays one sample when that holds for all its trained turns in one sequence;
  otherwise (the template rewrites earlier turns, as Qwen3 drops past reasoning, or an earlier
  reply starting with a newline would merge with the prompt's "\\n") each trained turn is its own
  sample `messages[:i + 1]`, id `<id>#k`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.files import write_jsonl
from tests.realvocab import FIXTURES, needs_real_vocab

pytestmark = needs_real_vocab

IM_START, IM_END, ASSISTANT, NEWLINE = 151644, 151645, 77091, 198
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


# --------------------------------------------------------------------------------------------
# the independent reference


class Reference:
    """Qwen's tokenizer from its published files (tokenizers) and a chat template (jinja2)."""

    def __init__(self, kind: str):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(FIXTURES / "vocab.json"), str(FIXTURES / "merges.txt")))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        config = json.loads((FIXTURES / kind / "tokenizer_config.json").read_text(encoding="utf-8"))
        for i, spec in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
            added = AddedToken(spec["content"], normalized=spec["normalized"], special=spec["special"])
            (tok.add_special_tokens if spec["special"] else tok.add_tokens)([added])
            assert tok.token_to_id(spec["content"]) == int(i)
        assert tok.encode("Hello world").ids == [9707, 1879]  # the fixtures README's check
        self.tok = tok

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
        self.template = env.from_string((FIXTURES / kind / "chat_template.jinja").read_text(encoding="utf-8"))

    def render(self, messages: list[dict], generation: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=generation)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _sample(self, messages: list[dict], turns: list[int]) -> tuple[list[int], list[int]] | None:
        """One sequence training `turns`, or None when some turn's context is not its inference prompt."""
        full = self.render(messages)
        ids: list[int] = []
        trained: list[bool] = []
        pos = 0
        for i in turns:
            prompt, upto = self.render(messages[:i], True), self.render(messages[: i + 1])
            if not (full.startswith(prompt) and full.startswith(upto)):
                return None
            end = upto.rindex("<|im_end|>", len(prompt)) + len("<|im_end|>")
            context = self.encode(full[pos: len(prompt)])
            ids += context
            trained += [False] * len(context)
            if ids != self.encode(prompt):  # the tokens inference sends before this turn
                return None
            reply = self.encode(full[len(prompt): end])
            ids += reply
            trained += [True] * len(reply)
            pos = end
        rest = self.encode(full[pos:])
        ids += rest
        trained += [False] * len(rest)
        trained[0] = False
        return ids, [t if keep else -100 for t, keep in zip(ids, trained)]

    def samples(self, sid: str, messages: list[dict], train_on: str = "all_assistant",
                multi_turn: str = "auto") -> list[tuple[str, list[int], list[int]]]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = turns[-1:] if train_on == "last_assistant" else turns
        if multi_turn == "auto" or len(turns) == 1:
            whole = self._sample(messages, turns)
            if whole is not None:
                return [(sid, *whole)]
        if len(turns) == 1:
            return [(sid, *self._sample(messages[: turns[0] + 1], turns))]
        return [(f"{sid}#{k}", *self._sample(messages[: i + 1], [i])) for k, i in enumerate(turns, 1)]


@pytest.fixture(scope="module", params=["qwen2.5", "qwen3"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def reference(kind):
    return Reference(kind)


@pytest.fixture(scope="module")
def tok_dir(kind, qwen25_tokenizer_dir, qwen3_tokenizer_dir):
    return qwen25_tokenizer_dir if kind == "qwen2.5" else qwen3_tokenizer_dir


# --------------------------------------------------------------------------------------------
# the conversations


def conv(*turns: str, system: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system is not None else []
    for k, text in enumerate(turns):
        out.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
    return out


CASES = {
    "single": conv("Say hello.", "Hello!"),  # Qwen2.5 adds its default system prompt
    "system": conv("Say hello.", "Hello!", system="You are terse."),
    "newline_reply": conv("Write a poem.", "\nRoses are red."),  # 805 of BELLE's 1,000 dev rows start like this
    "spaces_newline_reply": conv("Write a poem.", "  \nRoses are red."),
    "blank_lines_reply": conv("List two.", "\n\n1. one\n2. two"),
    "space_reply": conv("Spell it.", " a b c"),
    "tab_reply": conv("Indent it.", "\t\n x = 1"),
    "cjk": conv("请把这句话翻译成英文：你好，世界", "Hello, world.", system="你是一个翻译助手。"),
    "cjk_reply": conv("Translate: good morning", "\n早上好！\n祝你今天愉快。"),
    "think": conv("What is 2+2?", "<think>\nSmall sums are easy.\n</think>\n\n2 + 2 = 4."),
    "multi": conv("Reverse: apple river", "river apple", "Again: stone cloud", "cloud stone", system="Be brief."),
    "multi_three": conv("a", "b", "c", "d", "e", "f"),
    "multi_newline_first": conv("Poem?", "\nRoses.", "Another?", "Violets."),
    "multi_newline_last": conv("Poem?", "Roses.", "Another?", "\n  \nViolets."),
    "multi_think": conv("2+2?", "<think>\nadd\n</think>\n\n4", "3+3?", "<think>\nadd again\n</think>\n\n6"),
    "multi_cjk": conv("你好", "你好！有什么可以帮你？", "讲个笑话", "\n好的：……"),
}


def _tokenize(tmp_path: Path, tok_dir: Path, rows: list[dict], **kw):
    from datasets import load_from_disk

    from tasks.tokenize import tokenize_dataset

    tmp_path.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = tokenize_dataset(tmp_path / "in.jsonl", str(tok_dir), cache_root=tmp_path / "cache", max_length=4096, **kw)
    got = [(r["id"], r["input_ids"], r["labels"]) for r in load_from_disk(str(result.path))]
    return got, result


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_tokenized_data_equals_the_independent_reference(tmp_path, kind, reference, tok_dir, train_on):
    rows = [{"id": name, "messages": messages} for name, messages in CASES.items()]
    got, result = _tokenize(tmp_path, tok_dir, rows, train_on=train_on)
    expected = [s for r in rows for s in reference.samples(r["id"], r["messages"], train_on)]
    assert [g[0] for g in got] == [e[0] for e in expected]
    for g, e in zip(got, expected):
        assert g == e, g[0]
    split = {e[0].split("#")[0] for e in expected if "#" in e[0]}
    assert result.stats["split_conversations"] == len(split)
    assert result.stats["split_samples"] == sum("#" in e[0] for e in expected)
    assert result.stats["rejected_total"] == 0
    if train_on == "all_assistant":
        # Qwen3 rewrites every earlier turn; Qwen2.5 only where an earlier reply starts with a newline.
        multi = {name for name, m in CASES.items() if sum(x["role"] == "assistant" for x in m) > 1}
        assert split == (multi if kind == "qwen3" else {"multi_newline_first"})
        assert set(result.stats["split_because"]) == ({"template"} if kind == "qwen3" else {"token_boundary"})


def test_issue_16_reply_starting_with_newline_keeps_the_inference_prompt(tmp_path, qwen25_tokenizer_dir):
    # Before: the first trained token was ĊĊ (271), the template's "\n" merged with the reply's.
    rows = [{"id": "nl", "messages": CASES["newline_reply"]}, {"id": "sp", "messages": CASES["spaces_newline_reply"]}]
    got, _ = _tokenize(tmp_path, qwen25_tokenizer_dir, rows)
    for sid, ids, labels in got:
        first = next(k for k, lab in enumerate(labels) if lab != -100)
        assert ids[first - 3: first] == [IM_START, ASSISTANT, NEWLINE], sid
        assert ids[first] != 271
    first = next(k for k, lab in enumerate(got[0][2]) if lab != -100)
    assert got[0][1][first] == NEWLINE  # the reply's own "\n", trained


def test_qwen3_multi_turn_is_one_sample_per_turn_with_its_inference_context(tmp_path, qwen3_tokenizer_dir):
    ref = Reference("qwen3")
    messages = CASES["multi_think"]
    got, result = _tokenize(tmp_path, qwen3_tokenizer_dir, [{"id": "t", "messages": messages}])
    assert [g[0] for g in got] == ["t#1", "t#2"]
    for (sid, ids, labels), i in zip(got, (1, 3)):
        prompt = ref.encode(ref.render(messages[:i], True))
        assert ids[: len(prompt)] == prompt and all(lab == -100 for lab in labels[: len(prompt)])
        trained = [t for t in labels if t != -100]
        # The reasoning of the turn being trained is kept (the template drops it only from earlier turns).
        assert ref.tok.decode(trained, skip_special_tokens=False) == (
            "<think>\n" + ("add" if i == 1 else "add again") + "\n</think>\n\n" + ("4" if i == 1 else "6") + "<|im_end|>")
    assert result.stats["split_because"] == {"template": 1}


def test_multi_turn_options(tmp_path, qwen3_tokenizer_dir, qwen25_tokenizer_dir):
    rows = [{"id": "one", "messages": CASES["single"]}, {"id": "two", "messages": CASES["multi"]}]
    # split: every multi-turn conversation, prefix-stable or not.
    got, result = _tokenize(tmp_path / "split", qwen25_tokenizer_dir, rows, multi_turn="split")
    assert [g[0] for g in got] == ["one", "two#1", "two#2"]
    assert result.stats["split_because"] == {"multi_turn_split": 1} and result.stats["split_samples"] == 2
    # reject: the conversation Qwen3 rewrites is one reject naming it; the rest is kept.
    got, result = _tokenize(tmp_path / "reject", qwen3_tokenizer_dir, rows, multi_turn="reject")
    assert [g[0] for g in got] == ["one"]
    rejects = [json.loads(x) for x in result.rejects_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["line"], r["reason"]) for r in rejects] == [("two", 2, "not_prefix_stable")]
    assert "tokenize.multi_turn: auto" in rejects[0]["detail"]
    # reject also covers an earlier reply whose first characters would merge with the prompt's.
    rows = [{"id": "nl", "messages": CASES["multi_newline_first"]}, {"id": "ok", "messages": CASES["multi"]}]
    got, result = _tokenize(tmp_path / "reject25", qwen25_tokenizer_dir, rows, multi_turn="reject")
    assert [g[0] for g in got] == ["ok"] and result.stats["rejected"] == {"not_prefix_stable": 1}


def test_a_turn_that_cannot_be_masked_is_one_reject(tmp_path, qwen25_tokenizer_dir):
    # A template that writes a marker first once a conversation has more than 4 messages: the
    # second turn's generation prompt (4 messages) is then not a prefix of its own render (5).
    template = tmp_path / "odd.jinja"
    template.write_text("{% if messages|length > 4 %}[long]{% endif %}"
                        + (FIXTURES / "qwen2.5" / "chat_template.jinja").read_text(encoding="utf-8"), encoding="utf-8")
    rows = [{"id": "a", "messages": CASES["single"]}, {"id": "b", "messages": CASES["multi"]}]
    got, result = _tokenize(tmp_path, qwen25_tokenizer_dir, rows, template=str(template))
    assert [g[0] for g in got] == ["a", "b#1"]
    rejects = [json.loads(x) for x in result.rejects_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["line"], r["reason"]) for r in rejects] == [("b#2", 2, "not_prefix_stable")]
    assert "assistant turn 2 (messages[4])" in rejects[0]["detail"]


# --------------------------------------------------------------------------------------------
# properties


@pytest.fixture(scope="module")
def builders(qwen25_tokenizer_dir, qwen3_tokenizer_dir):
    """One builder per template (setting one up reads the 151k vocabulary: a second or so)."""
    from tasks.templates import resolve_template
    from tasks.tokenize import _Builder, load_tokenizer

    out = {}
    for kind, folder in (("qwen2.5", qwen25_tokenizer_dir), ("qwen3", qwen3_tokenizer_dir)):
        tok = load_tokenizer(str(folder))
        out[kind] = _Builder(tok, resolve_template("auto", tok), "sft", "all_assistant", 4096, "drop", Path("in.jsonl"))
    return out


@pytest.fixture(scope="module")
def references():
    return {"qwen2.5": Reference("qwen2.5"), "qwen3": Reference("qwen3")}


# Replies heavy in what meets the template's "\n" at the boundary: newlines, spaces, tabs, CJK.
reply_text = st.lists(st.sampled_from(["\n", " ", "  ", "\t", "\r\n", "a", "Hello", "你好", "。", "1", "-", "<think>",
                                       "</think>", "'s", "é", "\u0301"]), max_size=12).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["qwen2.5", "qwen3"]), replies=st.lists(reply_text, min_size=1, max_size=3),
       system=st.one_of(st.none(), reply_text))
def test_any_reply_is_trained_after_exactly_the_inference_prompt(builders, references, kind, replies, system):
    b, ref = builders[kind], references[kind]
    b.tables, b.rejects = [], []
    messages = conv(*[x for k, r in enumerate(replies) for x in (f"question {k}", r)], system=system)
    b.add([(1, {"id": "x", "messages": messages})])
    assert not b.rejects
    got = [(s["id"], s["input_ids"], s["labels"]) for s in b.samples()]
    assert got == ref.samples("x", messages)
    # Stated without the reference's sample logic: each trained turn starts right after the
    # tokens of its generation prompt.
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for sid, ids, labels in got:
        mine = turns if len(got) == 1 else [turns[int(sid.split("#")[1]) - 1]]
        for i in mine:
            prompt = ref.encode(ref.render(messages[:i], True))
            assert ids[: len(prompt)] == prompt and labels[len(prompt)] != -100
