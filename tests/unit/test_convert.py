"""The data stage: every seed format converts field by field; every bad row lands in rejects with
its reason; inputs of every kind; the split is stable; the CLI's exit statuses."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tasks.convert import DataError, InputError, convert_cli, convert_dataset, messages_json

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def convert_one(tmp_path: Path, src: Path, **kw) -> tuple[list[dict], dict]:
    """Convert one input with no eval split; return the samples and the report."""
    result = convert_dataset([src], [], tmp_path / "out", eval_fraction=0.0, **kw)
    return read_jsonl(result.train_path), result.report


def content_id(messages: list[dict], meta: dict | None = None) -> str:
    """The documented id of a sample without an input id: sha256 of its messages JSON, then a
    newline and its meta JSON when it carries fields."""
    text = json.dumps(messages, ensure_ascii=False)
    if meta is not None:
        text += "\n" + json.dumps(meta, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------- seeds


def test_seed001_instruct_label_concatenates_instruct_and_input(tmp_path):
    samples, report = convert_one(tmp_path, FIXTURES / "seed001_poems.json")
    assert report["format_per_file"] == {str(FIXTURES / "seed001_poems.json"): "alpaca"}
    assert len(samples) == 5
    first = samples[0]
    assert list(first) == ["id", "messages", "source"]
    assert first["messages"] == [
        msg("user", "请你给哪吒写一首诗：哪吒降世，意气飞扬。\n逆天改命，破障冲霄。"),
        msg("assistant", "红绫缠腕，风火踏浪。\n不屈不悔，笑傲苍茫。"),
    ]
    assert first["id"] == content_id(first["messages"])
    assert first["source"] == "seed001_poems.json:2"  # the line where the array element starts
    assert [s["source"] for s in samples] == [f"seed001_poems.json:{n}" for n in (2, 7, 12, 17, 22)]
    assert samples[4]["messages"][1]["content"] == "欲翻天命，终难遂行。\n困局自招，悔恨难平。"


def test_seed000_sharegpt_keeps_input_id(tmp_path):
    samples, report = convert_one(tmp_path, FIXTURES / "seed000_qwen_sharegpt.json")
    assert samples == [
        {
            "id": "identity_0",
            "messages": [msg("user", "你是谁？"), msg("assistant", "我是双天至尊AIOTAS的助手")],
            "source": "seed000_qwen_sharegpt.json:2",
        }
    ]
    assert report["format_per_file"][str(FIXTURES / "seed000_qwen_sharegpt.json")] == "sharegpt"


def test_seed002_belle_human_role_is_user_multi_turn(tmp_path):
    samples, _ = convert_one(tmp_path, FIXTURES / "seed002_belle.jsonl")
    assert samples[0]["id"] == "belle-0"
    assert [m["role"] for m in samples[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert samples[0]["messages"][2] == msg("user", "你能做什么？")
    assert samples[1]["source"] == "seed002_belle.jsonl:2"


def test_seed003_messages_carry_type_and_source_fields_in_meta(tmp_path):
    samples, report = convert_one(tmp_path, FIXTURES / "seed003_messages.jsonl")
    assert report["format_per_file"][str(FIXTURES / "seed003_messages.jsonl")] == "messages"
    messages = [
        msg("system", "You are a helpful assistant."),
        msg("user", "What is your name?"),
        msg("assistant", "My name is Qwen."),
    ]
    meta = {"type": "chatml", "source": "self-made"}  # fields ftflow does not read are kept, not dropped
    assert samples[1] == {
        "id": content_id(messages, meta),
        "messages": messages,
        "meta": meta,
        "source": "seed003_messages.jsonl:2",
    }


def test_seed004_alpaca_joins_instruction_and_input_with_newline(tmp_path):
    samples, _ = convert_one(tmp_path, FIXTURES / "seed004_tang.jsonl")
    assert samples[0]["messages"] == [
        msg("system", "You are a helpful assistant and good at writing Tang poem. 你是一個樂於助人的助手且擅長寫唐詩。"),
        msg("user", "以下是一首唐詩的第一行，請用你的知識判斷並完成整首詩。\n床前明月光，"),
        msg("assistant", "疑是地上霜。舉頭望明月，低頭思故鄉。"),
    ]
    # an empty input leaves the instruction alone (no trailing newline)
    assert samples[1]["messages"][0] == msg("user", "寫一首關於春天的五言絕句。")


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    src = tmp_path / "h.jsonl"
    src.write_text(json.dumps({"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]}) + "\n")
    samples, _ = convert_one(tmp_path, src)
    assert samples[0]["messages"] == [
        msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2"), msg("assistant", "a2")
    ]  # fmt: skip


def test_messages_json_is_json_dumps():
    turns = [("system", 'a "quote" \\ and\nnewline'), ("user", "emoji 😀 RTL עברית \x00\x1f"), ("assistant", "")]
    expected = json.dumps([{"role": r, "content": c} for r, c in turns], ensure_ascii=False)
    assert messages_json(turns) == expected
    # U+2028 is legal unescaped JSON, but str.splitlines() ends a line there
    breaking = [("user", "a\u2028b\x85c")]
    assert "\u2028" not in messages_json(breaking)
    assert json.loads(messages_json(breaking))[0]["content"] == "a\u2028b\x85c"


# ---------------------------------------------------------------------------------------- rejects


def _m(*pairs: tuple[str, str], **extra) -> dict:
    return {"messages": [msg(r, c) for r, c in pairs], **extra}


UA = (("user", "hi"), ("assistant", "hello"))
# (raw line, the reason it is rejected for, or None when it is written)
CORPUS: list[tuple[bytes, str | None]] = [
    (b"\xef\xbb\xbf" + json.dumps(_m(*UA)).encode(), None),  # the BOM is accepted
    (b'{"messages": [', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
    (b"[1, 2]", "wrong_type"),
    (b'{"foo": 1}', "missing_field"),
    (b'{"messages": "hi"}', "wrong_type"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "missing_field"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "wrong_type"),
    (json.dumps(_m(("narrator", "x"), ("assistant", "y"))).encode(), "unknown_role"),
    (json.dumps(_m(("user", "a"), ("system", "s"), ("assistant", "b"))).encode(), "system_not_first"),
    (json.dumps(_m(("user", "a"), ("user", "b"), ("assistant", "c"))).encode(), "roles_not_alternating"),
    (json.dumps(_m(("assistant", "a"))).encode(), "roles_not_alternating"),
    (json.dumps(_m(("system", "s"), ("user", "a"))).encode(), "no_assistant_turn"),
    (json.dumps(_m(("user", "a"), ("assistant", "b"), ("user", "c"))).encode(), "last_turn_not_assistant"),
    (json.dumps(_m(("user", " \n"), ("assistant", "b"))).encode(), "empty_content"),
    (json.dumps({"instruction": "a", "output": "b"}).encode(), "format_mismatch"),
    (json.dumps(_m(*UA), ensure_ascii=False).encode(), "duplicate"),  # same content as line 1
    (b"", None),  # a blank line is not a row
    (json.dumps(_m(("user", "x"), ("assistant", "y"), id="A")).encode(), None),
    (json.dumps(_m(("user", "x2"), ("assistant", "y2"), id="A")).encode(), "duplicate_id"),
    (json.dumps(_m(("user", "x3"), ("assistant", "y3"), id=3.5)).encode(), "wrong_type"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}', "invalid_utf8"),
    (json.dumps(_m(("human", "q"), ("GPT", "a"))).encode(), None),  # aliases, any case
    (json.dumps(_m(("user", "t"), ("tool", "x"), ("assistant", "y"))).encode(), "unsupported_tool_call"),
    (json.dumps(_m(("user", "z"), ("assistant", "\u200b\ufeff \u2060"))).encode(), "empty_content"),  # invisible only
    (b'{"messages": [], "n": ' + b"7" * 5000 + b"}", "invalid_json"),  # past int's 4300-digit limit
]


def write_corpus(path: Path) -> None:
    path.write_bytes(b"\n".join(line for line, _ in CORPUS) + b"\n")


def test_every_reject_reason_lands_on_its_line(tmp_path):
    src = tmp_path / "mixed.jsonl"
    write_corpus(src)
    result = convert_dataset([src], [], tmp_path / "out", eval_fraction=0.0, max_reject_fraction=1.0)
    report = result.report
    rejects = {r["line"]: r for r in read_jsonl(result.rejects_path)}
    written = {int(s["source"].rsplit(":", 1)[1]) for s in read_jsonl(result.train_path)}
    for n, (line, reason) in enumerate(CORPUS, 1):
        if not line:
            assert n not in rejects and n not in written
        elif reason is None:
            assert n in written and n not in rejects, n
        else:
            assert rejects[n]["reason"] == reason, (n, rejects[n])
            assert rejects[n]["file"] == str(src) and rejects[n]["message"]
    assert rejects[5]["raw"] == '{"foo": 1}'  # JSONL rejects keep the raw line text
    assert rejects[3]["raw"] == '{"messages": [{"role": "user", "content": "caf\\xe9"}]}'
    rows_in = sum(1 for line, _ in CORPUS if line)
    assert report["rows_in"] == rows_in
    assert report["rows_in"] == report["rows_out"] + report["rejected"] + report["duplicates"]
    assert report["duplicates"] == 1 and "duplicate" not in report["by_reason"]
    expected = {}
    for _, reason in CORPUS:
        if reason not in (None, "duplicate"):
            expected[reason] = expected.get(reason, 0) + 1
    assert report["by_reason"] == expected
    assert json.loads(result.report_path.read_text()) == report


def test_bom_only_on_first_line_is_accepted(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "a", "output": "b"}).encode() + b"\r\n")
    samples, report = convert_one(tmp_path, src)
    assert report["rejected"] == 0 and samples[0]["messages"][0] == msg("user", "a")


def test_raise_policy_names_file_line_and_reason(tmp_path):
    src = tmp_path / "mixed.jsonl"
    write_corpus(src)
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2: invalid_json: .*data\.on_bad_row"):
        convert_dataset([src], [], tmp_path / "out", on_bad_row="raise")
    assert not (tmp_path / "out" / "train.jsonl").exists()
    assert not (tmp_path / "out" / "report.json").exists()


def _rows_with_bad(n_good: int, n_bad: int) -> str:
    good = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(n_good)]
    return "\n".join(good + ['{"instruction": "x"}'] * n_bad) + "\n"


def test_quarantine_threshold_fails_above_and_passes_at_limit(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(_rows_with_bad(98, 2))  # 2% rejected
    out = tmp_path / "out"
    (out).mkdir()
    (out / "train.jsonl").write_text("stale\n")
    with pytest.raises(DataError) as err:
        convert_dataset([src], [], out, max_reject_fraction=0.01)
    message = str(err.value)
    assert "2 of 100 rows rejected (2.00%)" in message and "data.max_reject_fraction = 0.01" in message
    assert str(out / "rejects.jsonl") in message
    assert err.value.report["by_reason"] == {"missing_field": 2}
    assert len(read_jsonl(out / "rejects.jsonl")) == 2  # kept to look at
    assert not (out / "train.jsonl").exists() and not (out / "report.json").exists()
    assert not list(out.glob(".tmp-*"))
    result = convert_dataset([src], [], out, max_reject_fraction=0.02)
    assert result.report["rejected"] == 2 and result.report["rows_out"] == 98


# ---------------------------------------------------------------------------------------- inputs


def _alpaca(i: int) -> dict:
    return {"instruction": f"question {i}", "output": f"answer {i}"}


def test_folder_glob_csv_parquet_json_array_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text("\n".join(json.dumps(_alpaca(i)) for i in range(3)) + "\n")
    (data / "b.json").write_text(json.dumps([_alpaca(i) for i in range(3, 6)], indent=2))
    (data / "c.csv").write_text('instruction,input,output\nquestion 6,,answer 6\n"question, 7","two\nlines",answer 7\n')
    rows = [_m(("user", f"u{i}"), ("assistant", f"a{i}")) for i in range(8, 10)]
    pq.write_table(pa.Table.from_pylist(rows), data / "sub" / "d.parquet", row_group_size=1)
    with gzip.open(data / "sub" / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps(_alpaca(10)) + "\n")
    (data / ".hidden.jsonl").write_text("not json\n")
    (data / "notes.txt").write_text("ignored\n")

    samples, report = convert_one(tmp_path, data)
    assert report["rows_in"] == 11 and report["rejected"] == 0
    by_source = {s["source"]: s for s in samples}
    assert by_source["c.csv:2"]["messages"][0] == msg("user", "question, 7\ntwo\nlines")
    assert by_source["sub/d.parquet:2"]["messages"] == [msg("user", "u9"), msg("assistant", "a9")]
    assert by_source["b.json:6"]["messages"][1] == msg("assistant", "answer 4")
    assert "sub/e.jsonl.gz:1" in by_source
    assert report["format_per_file"][str(data / "sub" / "d.parquet")] == "messages"

    globbed, report = convert_one(tmp_path, str(data / "**" / "*.parquet"))
    assert [s["source"] for s in globbed] == ["d.parquet:1", "d.parquet:2"]


def test_csv_json_cells_and_field_count(tmp_path):
    src = tmp_path / "chat.csv"
    conv = json.dumps([msg("user", "hi"), msg("assistant", "yo")]).replace('"', '""')
    src.write_text(f'id,messages\nr1,"{conv}"\nr2,"[oops"\nr3,"{conv}",extra\n')
    result = convert_dataset([src], [], tmp_path / "out", eval_fraction=0.0, max_reject_fraction=1.0)
    assert read_jsonl(result.train_path)[0]["messages"] == [msg("user", "hi"), msg("assistant", "yo")]
    assert {r["row"]: r["reason"] for r in read_jsonl(result.rejects_path)} == {2: "invalid_json", 3: "invalid_csv"}


def test_json_array_bad_element_is_rejected_alone(tmp_path):
    src = tmp_path / "arr.json"
    src.write_bytes(
        b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", output: "d"},\n'
        b' {"instruction": "\xff", "output": "x"},\n {"instruction": "e", "output": "f"},\n]\n'
    )
    result = convert_dataset([src], [], tmp_path / "out", eval_fraction=0.0, max_reject_fraction=1.0)
    assert [s["source"] for s in read_jsonl(result.train_path)] == ["arr.json:2", "arr.json:5"]
    rejects = read_jsonl(result.rejects_path)
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, "invalid_json"), (4, "invalid_utf8")]
    assert rejects[0]["raw"] == '{"instruction": "c", output: "d"}'


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path):
    src = tmp_path / "lines.json"
    src.write_text(json.dumps(_alpaca(1)) + "\n" + json.dumps(_alpaca(2)) + "\n")
    samples, _ = convert_one(tmp_path, src)
    assert [s["source"] for s in samples] == ["lines.json:1", "lines.json:2"]
    arrays = tmp_path / "arrays.json"  # JSONL whose rows are arrays: the first "]" is not the end
    arrays.write_text('[{"instruction": "a", "output": "b"}]\n[{"instruction": "c", "output": "d"}]\n')
    with pytest.raises(InputError, match=r"line 1: data after the array's closing \]"):
        convert_one(tmp_path, arrays)


def test_column_mapping_and_system_prompt(tmp_path):
    src = tmp_path / "qa.jsonl"
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2", "system": "own"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples, _ = convert_one(
        tmp_path, src, columns={"question": "instruction", "answer": "output"}, system_prompt="Be brief."
    )
    assert samples[0]["messages"] == [msg("system", "Be brief."), msg("user", "q1"), msg("assistant", "a1")]
    assert samples[1]["messages"][0] == msg("system", "own")  # only added where there is none
    with pytest.raises(DataError, match="data.columns"):
        convert_one(tmp_path, src, columns={"question": "prompt"})


def test_format_override_rejects_other_formats(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(_alpaca(0)) + "\n" + json.dumps(_m(*UA)) + "\n")
    result = convert_dataset([src], [], tmp_path / "out", fmt="messages", max_reject_fraction=1.0)
    assert [r["reason"] for r in read_jsonl(result.rejects_path)] == ["format_mismatch"]
    assert result.report["format_per_file"][str(src)] == "messages"


def test_text_rows_need_pretrain(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "raw corpus"}\n{"text": "more"}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(DataError, match="tokenize.objective: pretrain"):
        convert_one(tmp_path, src)
    samples, report = convert_one(tmp_path, src, objective="pretrain", max_reject_fraction=1.0)
    assert samples[0] == {"id": samples[0]["id"], "text": "raw corpus", "source": "t.jsonl:1"}
    assert report["by_reason"] == {"format_mismatch": 1}
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps(_m(("user", "q"))) + "\n")  # pretrain: no assistant turn is fine
    assert convert_one(tmp_path, chat, objective="pretrain")[0][0]["messages"] == [msg("user", "q")]


def test_unreadable_inputs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        convert_dataset([tmp_path / "nope.jsonl"], [], tmp_path / "out")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported file type"):
        convert_dataset([tmp_path / "x.txt"], [], tmp_path / "out")
    with pytest.raises(InputError, match="matches no supported"):
        convert_dataset([str(tmp_path / "*.jsonl")], [], tmp_path / "out")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read"):
        convert_dataset([tmp_path / "bad.parquet"], [], tmp_path / "out")


def test_hf_saved_dataset_and_load_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [_alpaca(i) for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    samples, report = convert_one(tmp_path, tmp_path / "saved")
    assert [s["source"] for s in samples] == [f"saved:{i}" for i in range(1, 5)]
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples2, report2 = convert_one(tmp_path, f"hf:{folder}")
    assert [s["messages"] for s in samples2] == [s["messages"] for s in samples]
    assert report2["by_file"][f"hf:{folder}"]["rows_in"] == 4


# ---------------------------------------------------------------------------------------- split


def test_split_is_stable_when_rows_are_added(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps(_alpaca(i)) for i in range(400)) + "\n")
    first = convert_dataset([src], [], tmp_path / "o1", eval_fraction=0.2, split_seed=7)
    src.write_text("\n".join(json.dumps(_alpaca(i)) for i in range(-200, 600)) + "\n")
    second = convert_dataset([src], [], tmp_path / "o2", eval_fraction=0.2, split_seed=7)
    ids = lambda p: {s["id"] for s in read_jsonl(p)}  # noqa: E731
    assert ids(first.eval_path) <= ids(second.eval_path)
    assert ids(first.train_path) <= ids(second.train_path)
    assert 40 < first.report["eval_rows"] < 120  # about 20% of 400
    other_seed = convert_dataset([src], [], tmp_path / "o3", eval_fraction=0.2, split_seed=8)
    assert ids(other_seed.eval_path) != ids(second.eval_path)


def test_eval_files_are_read_first_and_win_duplicates(tmp_path):
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(_alpaca(i)) for i in range(5)) + "\n")
    evals.write_text(json.dumps(_alpaca(2)) + "\n")
    result = convert_dataset([train], [evals], tmp_path / "out")
    assert [s["source"] for s in read_jsonl(result.eval_path)] == ["eval.jsonl:1"]
    assert result.report["train_rows"] == 4 and result.report["duplicates"] == 1
    assert read_jsonl(result.rejects_path)[0]["file"] == str(train)
    with pytest.raises(InputError, match="both data.train and data.eval"):
        convert_dataset([train], [train], tmp_path / "out2")


def test_outputs_are_in_place_and_hashed(tmp_path):
    result = convert_dataset([FIXTURES / "seed001_poems.json"], [], tmp_path / "out", eval_fraction=0.4)
    assert result.report["sha256"]["train"] == hashlib.sha256(result.train_path.read_bytes()).hexdigest()
    assert result.report["sha256"]["eval"] == hashlib.sha256(result.eval_path.read_bytes()).hexdigest()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["eval.jsonl", "rejects.jsonl", "report.json", "train.jsonl"]  # no temporary files left
    again = convert_dataset([FIXTURES / "seed001_poems.json"], [], tmp_path / "out", eval_fraction=0.4)
    assert again.report["sha256"] == result.report["sha256"]  # deterministic


# ---------------------------------------------------------------------------------------- CLI


def test_cli_one_file_rejects_beside_it_and_exit_statuses(tmp_path, caplog):
    out = tmp_path / "all.jsonl"
    report = tmp_path / "rep.json"
    shutil.copy(FIXTURES / "seed003_messages.jsonl", tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").open("a").write('{"messages": []}\n')
    inputs = [str(FIXTURES / "seed001_poems.json"), str(tmp_path / "m.jsonl")]
    with caplog.at_level("INFO", logger="ftflow"):
        assert convert_cli(inputs, str(out), report=str(report), max_reject_fraction=0.5) == 0
    assert len(read_jsonl(out)) == 7
    assert read_jsonl(tmp_path / "all.rejects.jsonl")[0]["reason"] == "empty_content"
    rep = json.loads(report.read_text())
    assert rep["rows_in"] == 8 and rep["sha256"]["out"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert "converted 8 rows" in caplog.text

    assert convert_cli(inputs, str(out), report=str(report)) == 1  # 1 of 8 rejected > 1%
    assert not out.exists() and json.loads(report.read_text())["status"] == "failed"
    assert convert_cli([str(tmp_path / "missing.jsonl")], str(out)) == 2
