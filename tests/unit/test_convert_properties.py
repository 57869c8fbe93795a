"""Property tests of the data stage: arbitrary unicode conversations and arbitrary bytes never
crash it; each row is a valid sample exactly when an independent statement of the rules says so."""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tasks.convert as convert
from tasks.convert import REASONS, DataError, convert_dataset

# 100 examples each (the default profile): a few seconds. Deeper: load a profile with more first.
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Emoji, RTL, combining marks, control characters, NUL, empty and long strings; no surrogates
# (a Python str with one cannot be written as UTF-8; the \ud800 escape case is a unit test).
contents = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("😀👍🏽\u200f\u202eשלום مرحبا\u0301\x00\x07\x1b\t\r\n \u2028")),
    st.text(min_size=300, max_size=2000),
    st.sampled_from(["", " ", "\n\t", "\u3000"]),
)
roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "USER", "tool", "", "Assistant"])
turn = st.fixed_dictionaries({"role": roles, "content": contents})
odd_turn = st.one_of(turn, st.just({"role": "user"}), st.builds(dict, role=roles, content=st.integers()), st.none())
conversations = st.lists(st.one_of(turn, turn, turn, odd_turn), max_size=6)

def blank(text: str) -> bool:
    """Nothing visible: whitespace and Unicode format characters (Cf: zero-width, BOM, marks)."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def expected_messages(turns: list, sft: bool) -> list[dict] | None:
    """The rules, stated independently of tasks.convert: the canonical messages, or None."""
    out = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            return None
        role = ALIASES.get(str(t.get("role")).lower())
        if role is None or blank(t["content"]):
            return None
        out.append({"role": role, "content": t["content"]})
    body = [m["role"] for m in out if m["role"] != "system"]
    if not out or "system" in [m["role"] for m in out[1:]]:
        return None
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        return None
    if sft and (not body or body[-1] != "assistant"):
        return None
    return out


def run(rows_bytes: list[bytes], **kw) -> tuple[list[dict], list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_bytes(b"\n".join(rows_bytes) + b"\n")
        try:
            result = convert_dataset([src], [], Path(tmp) / "out", max_reject_fraction=1.0, **kw)
            report = result.report
        except DataError as e:  # only "no usable rows", with a report and the rejects kept
            assert e.report is not None and e.report["rows_out"] == 0, e
            report = e.report
        out = Path(tmp) / "out"
        samples = []
        for name in ("train.jsonl", "eval.jsonl"):
            if (out / name).exists():
                samples += [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    return samples, rejects, report


@SETTINGS
@given(st.lists(conversations, min_size=1, max_size=5), st.sampled_from(["sft", "pretrain"]))
def test_conversations_are_valid_samples_or_clear_rejections(convs, objective):
    rows = [json.dumps({"messages": c}, ensure_ascii=False).encode() for c in convs]
    samples, rejects, report = run(rows, objective=objective, eval_fraction=0.5)
    assert report["rows_in"] == len(rows) == len(samples) + len(rejects)
    assert report["rows_in"] == report["rows_out"] + report["rejected"] + report["duplicates"]
    by_line = {int(s["source"].rsplit(":", 1)[1]): s for s in samples}
    rejected = {r["line"]: r for r in rejects}
    seen = []
    for n, conv in enumerate(convs, 1):
        want = expected_messages(conv, objective == "sft")
        if want is None:
            assert rejected[n]["reason"] in REASONS and rejected[n]["message"], rejected[n]
        elif want in seen:
            assert rejected[n]["reason"] == "duplicate"
        else:
            seen.append(want)
            assert by_line[n]["messages"] == want
            assert set(by_line[n]) == {"id", "messages", "source"} and len(by_line[n]["id"]) == 16


@SETTINGS
@given(st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b), min_size=1, max_size=8))
def test_arbitrary_bytes_never_crash(lines):
    samples, rejects, report = run(lines)
    assert report["rows_in"] == len(samples) + len(rejects)
    assert all(r["reason"] in REASONS or r["reason"] == "duplicate" for r in rejects)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(st.lists(json_values, max_size=8), st.sampled_from([None, 1, 2]), st.integers(min_value=1, max_value=64))
def test_json_array_stream_equals_json_load(values, indent, chunk):
    """The streaming array reader yields exactly json.load's elements, whatever the chunk size."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.json"
        src.write_text(json.dumps(values, indent=indent, ensure_ascii=False), encoding="utf-8")
        old = convert._CHUNK
        convert._CHUNK = chunk
        try:
            got = [row for _, _, row in convert._read_json(src)]
        finally:
            convert._CHUNK = old
    assert got == values


alpaca_rows = st.fixed_dictionaries(
    {"instruction": contents, "output": contents},
    optional={
        "input": st.one_of(contents, st.none(), st.integers()),
        "system": st.one_of(contents, st.none()),
        "history": st.lists(st.tuples(contents, contents).map(list), max_size=2),
    },
)


@SETTINGS
@given(alpaca_rows, st.sampled_from([None, "Be brief.", "שלום 😀"]))
def test_plain_alpaca_fast_path_equals_general_path(row, system_prompt):
    """Where the fast path takes a row, it writes what the general path writes."""
    prefix = "["
    if system_prompt:
        prefix += json.dumps({"role": "system", "content": system_prompt}, ensure_ascii=False) + ", "
    fast = convert._plain_alpaca(row, prefix + '{"role": "user", "content": ')
    if fast is None:
        return
    turns = convert._alpaca(row)
    if system_prompt and turns[0][0] != "system":
        turns.insert(0, ("system", system_prompt))
    convert._check(turns, sft=True)  # must not reject
    assert fast == convert.messages_json(turns)
