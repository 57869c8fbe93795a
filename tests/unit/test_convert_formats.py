"""The formats users bring, each in its real shape (tests/fixtures/data/formats/, written after the
public demo files of LLaMA-Factory, BELLE, Qwen's finetune.py, OpenAI and TRL): every row is
written, rejected with a reason that names the feature, or counted as a duplicate
(rows in = out + rejected + duplicates), and the canonical messages equal an expectation written
by hand here, field by field. Fields ftflow does not read are carried in `meta`, never dropped."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from tasks.convert import REASONS, convert_cli

FORMATS = Path(__file__).resolve().parent.parent / "fixtures" / "data" / "formats"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def U(content: str) -> dict:
    return msg("user", content)


def A(content: str) -> dict:
    return msg("assistant", content)


def S(content: str) -> dict:
    return msg("system", content)


def content_id(messages: list[dict], meta: dict | None) -> str:
    """The README's id of a sample with no input id: sha256 of the messages JSON (+ "\\n" + meta JSON)."""
    text = json.dumps(messages, ensure_ascii=False) + ("\n" + json.dumps(meta, ensure_ascii=False) if meta else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_in_file(path: Path) -> int:
    """How many rows the file holds, counted without ftflow: the independent side of the invariant."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return len(list(csv.DictReader(text.splitlines(keepends=True))))
    stripped = text.lstrip()
    if stripped.startswith("["):
        return len(json.loads(text))
    try:
        json.loads(text)
        return 1  # one (pretty-printed) object
    except json.JSONDecodeError:
        return sum(1 for line in text.splitlines() if line.strip())


CREPES = "Making crepes is an easy and delicious process! Whisk flour, eggs, milk and a pinch of salt, rest the batter, then cook thin layers in a hot buttered pan."
SUMMARY_IN = "Summarize the text.\nPrefect runs flows, retries tasks and caches results."
SUMMARY_OUT = "Prefect orchestrates flows, with retries and caching."

# file -> (samples written: (messages, meta or None, input id or None), reasons of the rejects in order, duplicates)
EXPECTED: dict[str, tuple[list[tuple[list[dict], dict | None, str | None]], list[str], int]] = {
    "alpaca_instruction.json": (
        [
            ([U("Describe a process of making crepes."), A(CREPES)], None, None),
            ([U("Translate the sentence into French.\nThe cat sleeps on the sofa."), A("Le chat dort sur le canapé.")], None, None),
            (
                [S("You are a translator."), U("Translate the sentence into French.\nThe cat sleeps on the sofa."),
                 A("Le chat dort sur le canapé."), U("And into German?"), A("Die Katze schläft auf dem Sofa.")],
                None, None,
            ),
        ],
        [],
        1,  # the fourth row repeats the first
    ),
    "alpaca_instruct_label.jsonl": (
        [
            ([U("请你给敖丙写一首诗：碧海生龙子，云中舞雪霜。"), A("恩仇难两忘，何处是家乡？")], None, None),  # seed 001 concatenates
            ([U("请你给申公豹写一首诗："), A("阴谋藏袖里，步步为权谋。")], None, None),
        ],
        [],
        0,
    ),
    "sharegpt_human_gpt.json": (
        [
            ([U("你是谁？"), A("我是一个语言模型，我叫通义千问。")], None, "identity_0"),
            (
                [S("You are a helpful assistant."), U("What can you do?"), A("I can answer questions and write text."),
                 U("Write a haiku."), A("Autumn moonlight—\na worm digs silently\ninto the chestnut.")],
                None, "identity_1",
            ),
        ],
        [],
        0,
    ),
    "sharegpt_user_assistant.jsonl": (
        [
            ([U("Name three primary colors."), A("Red, blue and yellow.")], None, None),
            ([S("Answer briefly."), U("2+2?"), A("4")], None, None),
        ],
        [],
        0,
    ),
    "belle_human_assistant.jsonl": (
        [  # BELLE's leading newlines and spaces are kept exactly (the template stage owns the boundary)
            ([U("写一篇关于人工智能的短文。\n"), A("\n人工智能正在改变我们的生活。\n\n它可以帮助医生诊断疾病。")], None, "77771"),
            ([U("给我推荐一本书。"), A("  \n《三体》是一部优秀的科幻小说。"), U("作者是谁？"), A("刘慈欣。")], None, "77772"),
        ],
        [],
        0,
    ),
    "openai_messages.jsonl": (
        [
            (
                [S("Marv is a factual chatbot that is also sarcastic."), U("What's the capital of France?"),
                 A("Paris, as if everyone doesn't know that already.")],
                None, None,
            ),
            (
                [U("Who wrote 'Romeo and Juliet'?"), A("Oh, just some guy named William Shakespeare. Ever heard of him?")],
                {"tool_calls": None}, None,
            ),
        ],
        ["unsupported_message_field"],  # OpenAI's per-message `weight` would change what is trained
        0,
    ),
    "glaive_toolcall.json": (
        [([U("What is the capital of Japan?"), A("Tokyo.")], {"tools": "[]"}, None)],  # no tools declared: kept
        ["unsupported_tool_call", "unsupported_tools"],  # a call; tools declared but not called
        0,
    ),
    "openai_tool_calls.jsonl": ([], ["unsupported_tool_call", "unsupported_tools", "unsupported_tool_call"], 0),
    "mllm_demo.json": (
        [([U("Who won the 2014 World Cup?"), A("Germany.")], {"images": []}, None)],  # an empty list drops nothing
        ["unsupported_images", "unsupported_videos", "unsupported_images"],
        0,
    ),
    "kto_demo.json": ([], ["unsupported_kto_label", "unsupported_kto_label"], 0),
    "dpo_sharegpt.json": ([], ["unsupported_preference_pair"], 0),
    "dpo_shapes.jsonl": ([], ["unsupported_preference_pair"] * 5, 0),
    "one_object.json": ([([U("Say hi."), A("Hi!")], {"source": "hand-written"}, "only")], [], 0),
    "pretty_array.jsonl": ([([U("One?"), A("1")], None, None), ([U("Two?"), A("2")], None, None)], [], 0),
    "alpaca.csv": (
        [
            ([U(SUMMARY_IN), A(SUMMARY_OUT)], {"category": "summarization"}, None),
            ([U("Write a two-line poem, please."), A("Roses are red,\nviolets are blue.")], {"category": "creative"}, None),
            ([U(SUMMARY_IN), A(SUMMARY_OUT)], {"category": "summarization-dup"}, None),  # differs in a kept field
        ],
        [],
        0,
    ),
}

# What each reject's message must say: the feature, and what to do.
HINTS = {
    "unsupported_preference_pair": ("preference pair", "preference trainer"),
    "unsupported_kto_label": ("KTO", "labelled true"),
    "unsupported_images": ("multimodal", "vision-language trainer"),
    "unsupported_videos": ("multimodal", "vision-language trainer"),
    "unsupported_tools": ("tool", "Drop these rows"),
    "unsupported_tool_call": ("function calling", "Drop these rows"),
    "unsupported_message_field": ("`weight`", "Remove `weight`"),
}


def test_every_fixture_has_an_expectation():
    assert sorted(p.name for p in FORMATS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_format_converts_exactly_or_names_what_it_rejects(tmp_path, name):
    src = FORMATS / name
    before = src.read_bytes()
    out, report_path = tmp_path / "out.jsonl", tmp_path / "report.json"
    status = convert_cli([str(src)], str(out), report=str(report_path), max_reject_fraction=1.0)
    want_samples, want_reasons, want_dups = EXPECTED[name]
    assert status == (0 if want_samples else 1)  # 1: no usable rows (every row rejected), with the rejects kept
    assert src.read_bytes() == before
    report = json.loads(report_path.read_text(encoding="utf-8"))
    rows = rows_in_file(src)
    assert report["rows_in"] == rows == len(want_samples) + len(want_reasons) + want_dups
    assert report["rows_in"] == report["rows_out"] + report["rejected"] + report["duplicates"]
    assert (report["rows_out"], report["rejected"], report["duplicates"]) == (len(want_samples), len(want_reasons), want_dups)

    samples = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if want_samples else []
    assert not want_samples or out.exists()
    got = [(s["messages"], s.get("meta"), s["id"]) for s in samples]
    want = [(m, meta, ident or content_id(m, meta)) for m, meta, ident in want_samples]
    assert got == want
    for s in samples:
        assert set(s) <= {"id", "messages", "meta", "source"} and s["source"].startswith(name + ":")

    rejects = [json.loads(line) for line in out.with_name("out.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reason"] for r in rejects if r["reason"] != "duplicate"] == want_reasons
    assert sum(r["reason"] == "duplicate" for r in rejects) == want_dups
    for r in rejects:
        assert r["reason"] in REASONS or r["reason"] == "duplicate"
        for fragment in HINTS.get(r["reason"], ()):
            assert fragment in r["message"], (r["reason"], r["message"])


def test_rows_that_differ_only_in_a_carried_field_are_not_duplicates(tmp_path):
    src = tmp_path / "tools.jsonl"
    rows = [
        {"messages": [U("q"), A("a")], "tools": "[]", "category": "x"},
        {"messages": [U("q"), A("a")], "tools": "[]", "category": "y"},
        {"messages": [U("q"), A("a")], "tools": "[]", "category": "x"},  # the same as the first in everything
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert convert_cli([str(src)], str(out), report=str(tmp_path / "r.json"), max_reject_fraction=1.0) == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["meta"] for s in samples] == [{"tools": "[]", "category": "x"}, {"tools": "[]", "category": "y"}]
    assert json.loads((tmp_path / "r.json").read_text())["duplicates"] == 1


def _convert_rows(tmp_path: Path, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    convert_cli([str(src)], str(out), max_reject_fraction=1.0)
    samples = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    rejects = [json.loads(line) for line in out.with_name("out.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    return samples, rejects


def test_system_field_applies_to_both_chat_formats_and_a_conflict_is_named(tmp_path):
    samples, rejects = _convert_rows(tmp_path, [
        {"messages": [U("q1"), A("a1")], "system": "Be brief."},
        {"messages": [S("Be brief."), U("q2"), A("a2")], "system": "Be brief."},  # the same: nothing lost
        {"messages": [S("Be long."), U("q3"), A("a3")], "system": "Be brief."},
    ])  # fmt: skip
    assert [s["messages"] for s in samples] == [[S("Be brief."), U("q1"), A("a1")], [S("Be brief."), U("q2"), A("a2")]]
    assert [r["reason"] for r in rejects] == ["conflicting_system"]


def test_alpaca_with_both_spellings_keeps_the_unread_one_in_meta(tmp_path):
    samples, _ = _convert_rows(tmp_path, [{"instruction": "q", "instruct": "q (old)", "output": "a", "label": "a (old)"}])
    assert samples[0]["messages"] == [U("q"), A("a")]
    assert samples[0]["meta"] == {"instruct": "q (old)", "label": "a (old)"}


def test_empty_feature_fields_are_not_features(tmp_path):
    samples, rejects = _convert_rows(tmp_path, [
        {"messages": [U("q"), A("a")], "images": [], "tools": None, "chosen": ""},
        {"messages": [U("q"), A("a"), U("q?"), A("b")], "label": "not a KTO flag"},
    ])  # fmt: skip
    assert rejects == []
    assert [s["meta"] for s in samples] == [{"images": [], "tools": None, "chosen": ""}, {"label": "not a KTO flag"}]


def test_parquet_index_columns_are_not_meta(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["a", "a"], "output": ["b", "b"], "__index_level_0__": [5, 9]})
    pq.write_table(table, tmp_path / "p.parquet")
    out = tmp_path / "out.jsonl"
    assert convert_cli([str(tmp_path / "p.parquet")], str(out), report=str(tmp_path / "r.json")) == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["messages"], s.get("meta")) for s in samples] == [([U("a"), A("b")], None)]
    assert json.loads((tmp_path / "r.json").read_text())["duplicates"] == 1  # pandas' row numbers made no difference


def test_cr_only_json_array_keeps_its_line_numbers(tmp_path):
    src = tmp_path / "cr.json"
    src.write_bytes(b'[\r {"instruction": "a", "output": "b"},\r {"instruction": "c", output: "d"},\r'
                    b' {"instruction": "e", "output": "f"}\r]\r')
    out = tmp_path / "out.jsonl"
    convert_cli([str(src)], str(out), max_reject_fraction=1.0)
    assert [json.loads(line)["source"] for line in out.read_text().splitlines()] == ["cr.json:2", "cr.json:4"]
    reject = json.loads(out.with_name("out.rejects.jsonl").read_text())
    assert (reject["line"], reject["reason"]) == (3, "invalid_json")
