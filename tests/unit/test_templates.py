"""Chat templates: resolution, rendering, and the trained character spans derived from prefixes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from tasks.templates import BUILTIN_TEMPLATES, TemplateError, render, resolve_template, trained_char_spans

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse the words: apple river"},
    {"role": "assistant", "content": "river apple"},
    {"role": "user", "content": "Again: stone cloud"},
    {"role": "assistant", "content": "cloud stone"},
]
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_resolve_auto_builtin_and_file(tok, tmp_path):
    assert resolve_template("auto", tok) == tok.chat_template
    for name, text in BUILTIN_TEMPLATES.items():
        assert resolve_template(name, tok) == text
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_template(str(f), tok) == f.read_text()


def test_resolve_errors_name_the_config_key(tok):
    with pytest.raises(TemplateError, match=r"tokenize\.template"):
        resolve_template("auto", SimpleNamespace(chat_template=None, name_or_path="some/model"))
    with pytest.raises(TemplateError, match=r"tokenize\.template.*neither"):
        resolve_template("no-such-template.jinja", tok)
    # ChatML written for a tokenizer without <|im_start|>/<|im_end|> as single tokens.
    no_chatml = SimpleNamespace(all_special_tokens=["</s>"], added_tokens_decoder={}, convert_tokens_to_ids=None)
    with pytest.raises(TemplateError, match="im_start"):
        resolve_template("chatml", no_chatml)


def test_builtin_chatml_renders_like_transformers(tok):
    text = render(tok, BUILTIN_TEMPLATES["chatml"], CONV)
    assert text == tok.apply_chat_template(CONV, tokenize=False)
    prompt = render(tok, BUILTIN_TEMPLATES["chatml"], CONV[:-1], add_generation_prompt=True)
    assert prompt == tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_llama2_and_plain_literal_renderings(tok):
    assert render(tok, BUILTIN_TEMPLATES["llama2"], CONV[:3]) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nReverse the words: apple river [/INST] river apple" + EOS
    )
    assert render(tok, BUILTIN_TEMPLATES["llama2"], CONV[1:-1], add_generation_prompt=True) == (
        "[INST] Reverse the words: apple river [/INST] river apple" + EOS + "[INST] Again: stone cloud [/INST]"
    )
    assert render(tok, BUILTIN_TEMPLATES["plain"], CONV[1:3]) == "Reverse the words: apple river\nriver apple" + EOS


@pytest.mark.parametrize("name, before", [("chatml", ""), ("llama2", " "), ("plain", "")])
def test_spans_are_content_plus_end_token(tok, name, before):
    text, spans = trained_char_spans(tok, BUILTIN_TEMPLATES[name], CONV, "sft", "all_assistant")
    assert [text[a:b] for a, b in spans] == [before + "river apple" + EOS, before + "cloud stone" + EOS]
    # Each span starts where the generation prompt of its turn ends.
    for (a, _), i in zip(spans, (2, 4)):
        assert a == len(render(tok, BUILTIN_TEMPLATES[name], CONV[:i], add_generation_prompt=True))


def test_chatml_span_excludes_trailing_newline(tok):
    text, spans = trained_char_spans(tok, BUILTIN_TEMPLATES["chatml"], CONV, "sft", "all_assistant")
    assert text[spans[-1][1]:] == "\n"


def test_last_assistant_and_pretrain(tok):
    text, spans = trained_char_spans(tok, BUILTIN_TEMPLATES["chatml"], CONV, "sft", "last_assistant")
    assert [text[a:b] for a, b in spans] == ["cloud stone" + EOS]
    text, spans = trained_char_spans(tok, BUILTIN_TEMPLATES["chatml"], CONV, "pretrain", "all_assistant")
    assert spans == [(0, len(text))]


def test_template_without_eos_falls_back_to_turn_end(tok):
    # A template that ends turns with its own marker, not the tokenizer's eos.
    tpl = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' [END]\n\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    text, spans = trained_char_spans(tok, tpl, CONV[1:3], "sft", "all_assistant")
    assert [text[a:b] for a, b in spans] == ["river apple [END]"]


def test_prefix_inconsistent_template_is_a_clear_error(tok):
    # Writes the number of messages first: a prefix rendering is never a prefix of the full one.
    tpl = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="not a prefix"):
        trained_char_spans(tok, tpl, CONV, "sft", "all_assistant")


def test_invalid_jinja_is_a_clear_error(tok):
    with pytest.raises(TemplateError, match=r"tokenize\.template.*not valid Jinja"):
        render(tok, "{% for m in messages %}{{ m['content'] }", CONV)
