"""Bad input is refused before any heavy work, with one paragraph naming the file/key and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftflow.config import load_config
from tasks.preflight import PreflightError, check

REPO = Path(__file__).resolve().parents[2]


def cfg_with(tmp_path: Path, model: str, extra: list[str] | None = None):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{train: [d.jsonl]}}\nmodel: {{name_or_path: '{model}'}}\ntrain: {{deepspeed: null, nproc_per_node: 1}}\n")
    return load_config(p, extra or [])


@pytest.fixture()
def model_copy(tmp_path, tiny_model_dir) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_demo_config_passes(tiny_model_dir):
    check(load_config(REPO / "configs" / "demo.yaml"))


def test_missing_data_file_is_named(tmp_path):
    cfg = cfg_with(tmp_path, "embedded:tiny-qwen2", ["data.train=[nope.jsonl]"])
    with pytest.raises(PreflightError, match=r"data.train: 'nope.jsonl' does not exist"):
        check(cfg)


def test_model_folder_without_weights(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(PreflightError, match=r"has no weights \(\*\.safetensors\).*pickle files"):
        check(cfg_with(tmp_path, str(model_copy)))


def test_model_needing_remote_code_is_refused_by_default(tmp_path, model_copy):
    cfg_file = model_copy / "config.json"
    config = json.loads(cfg_file.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(PreflightError, match=r"custom Python code.*model.trust_remote_code: true"):
        check(cfg_with(tmp_path, str(model_copy)))
    check(cfg_with(tmp_path, str(model_copy), ["model.trust_remote_code=true"]))  # explicit opt-in


def test_tokenizer_without_chat_template(tmp_path, model_copy):
    (model_copy / "chat_template.jinja").unlink()
    tc = json.loads((model_copy / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(PreflightError, match=r"tokenize.template: auto.*no chat template.*chatml"):
        check(cfg_with(tmp_path, str(model_copy)))
    check(cfg_with(tmp_path, str(model_copy), ["tokenize.template=chatml"]))


def test_max_length_beyond_context(tmp_path, model_copy):
    with pytest.raises(PreflightError, match=r"tokenize.max_length=4096 is larger than the model's context"):
        check(cfg_with(tmp_path, str(model_copy), ["tokenize.max_length=4096"]))


def test_all_problems_reported_at_once(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    cfg = cfg_with(tmp_path, str(model_copy), ["data.train=[nope.jsonl]", "tokenize.max_length=4096"])
    with pytest.raises(PreflightError) as err:
        check(cfg)
    assert str(err.value).count("\n  - ") == 3


def test_cli_refuses_before_heavy_work(tmp_path):
    """`ftflow run` on a bad config exits 2 within seconds, naming the key — no flow is started."""
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: [missing.jsonl]}\ntrain: {learning_rat: 1}\n")
    out = subprocess.run([sys.executable, "-m", "ftflow.cli", "run", str(p)], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "FTFLOW_HOME": str(tmp_path / "home")})
    assert out.returncode == 2
    assert "unknown key 'train.learning_rat'" in out.stderr and "Did you mean 'train.learning_rate'" in out.stderr
    assert not (tmp_path / "home" / "runs").exists()


# ------------------------------------------------------------------------------------------------
# `ftflow convert` on bad data files, through the real CLI: one table row per case with the input,
# the expected exit status, a fragment of the message, and the invariant that must hold.
# ------------------------------------------------------------------------------------------------

import csv as _csv  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402


def _row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _jsonl(*rows: dict, end: str = "\n") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + end for r in rows).encode()


GOOD = _jsonl(_row("2+2?", "4"), _row("Capital of France?", "Paris"))
DEEP = "[" * 5000 + "]" * 5000
BIG = "9" * 5000


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@dataclass
class Case:
    name: str
    files: dict[str, bytes]  # written under tmp/in/
    args: list[str]  # {in} is tmp/in, {tmp} is tmp; the first args are the inputs
    status: int
    says: str = ""  # a fragment of stderr
    counts: tuple[int, int, int, int] | None = None  # rows_in, rows_out, rejected, duplicates (from --report)
    reasons: dict[str, int] = field(default_factory=dict)  # reject reasons expected (by_reason), when counts given
    outputs: list[dict] | None = None  # the exact messages written, when given
    setup: Callable[[Path], None] | None = None  # special files (links, FIFOs, folders)
    one_line: bool = False  # a refusal: exactly one line on stderr


def _symlink_out_to_input(tmp: Path) -> None:
    (tmp / "link.jsonl").symlink_to(tmp / "in" / "a.jsonl")


def _hard_link_to_input(tmp: Path) -> None:
    os.link(tmp / "in" / "a.jsonl", tmp / "link.jsonl")


def _out_is_dir(tmp: Path) -> None:
    (tmp / "out.jsonl").mkdir()


def _out_is_fifo(tmp: Path) -> None:
    os.mkfifo(tmp / "out.jsonl")


def _out_is_read_only(tmp: Path) -> None:
    (tmp / "out.jsonl").write_text("kept\n")
    (tmp / "out.jsonl").chmod(0o444)


def _input_is_fifo(tmp: Path) -> None:
    os.mkfifo(tmp / "pipe.jsonl")


def _out_is_device(tmp: Path) -> None:
    # a private copy of /dev/null's node: never the real one, which a regression would replace (as root)
    try:
        os.mknod(tmp / "out.jsonl", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")


def _out_links_elsewhere(tmp: Path) -> None:
    (tmp / "keep.jsonl").write_text("precious\n")
    (tmp / "out.jsonl").symlink_to(tmp / "keep.jsonl")


REPORT = ["--report", "{tmp}/report.json"]
ALL = ["--max-reject-fraction", "1"]

CASES = [
    # destroys data: an output that is an input, however it is spelled, or not a regular file
    Case("out_is_input", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{in}/a.jsonl"], 2, "is the input", one_line=True),
    Case("out_is_input_other_spelling", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{in}/../in/./a.jsonl"], 2,
         "is the input", one_line=True),
    Case("out_is_input_via_symlink", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/link.jsonl"], 2,
         "is the input", setup=_symlink_out_to_input, one_line=True),
    Case("out_is_hard_link_to_input", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/link.jsonl"], 2,
         "is the input", setup=_hard_link_to_input, one_line=True),
    Case("out_is_input_inside_input_folder", {"a.jsonl": GOOD}, ["{in}", "--out", "{in}/a.jsonl"], 2, "is the input",
         one_line=True),
    Case("report_is_input", {"a.jsonl": GOOD, "r.json": b'{"instruction": "a", "output": "b"}\n'},
         ["{in}/a.jsonl", "{in}/r.json", "--out", "{tmp}/out.jsonl", "--report", "{in}/r.json"], 2, "--report",
         one_line=True),
    Case("rejects_file_is_input", {"x.rejects.jsonl": GOOD}, ["{in}/x.rejects.jsonl", "--out", "{in}/x.jsonl"], 2,
         "rejects file", one_line=True),
    Case("out_is_report", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/o.json", "--report", "{tmp}/o.json"], 2,
         "same file as", one_line=True),
    Case("out_is_directory", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/out.jsonl"], 2, "is a directory",
         setup=_out_is_dir, one_line=True),
    Case("out_is_fifo", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/out.jsonl"], 2, "FIFO",
         setup=_out_is_fifo, one_line=True),
    Case("out_is_device", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/out.jsonl"], 2, "character device",
         setup=_out_is_device, one_line=True),
    Case("out_is_symlink", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/out.jsonl"], 2, "symbolic link",
         setup=_out_links_elsewhere, one_line=True),
    Case("out_is_read_only", {"a.jsonl": GOOD}, ["{in}/a.jsonl", "--out", "{tmp}/out.jsonl"], 2, "read-only",
         setup=_out_is_read_only, one_line=True),
    Case("input_is_fifo", {}, ["{tmp}/pipe.jsonl", "--out", "{tmp}/out.jsonl"], 2, "is a FIFO", setup=_input_is_fifo,
         one_line=True),
    Case("too_deep_to_write_back", {"d.json": ('[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                               '"content": "b"}], "x": ' + "[" * 995 + "]" * 995 + "}]").encode()},
         ["{in}/d.json", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 1, "no usable rows", counts=(1, 0, 1, 0),
         reasons={"invalid_json": 1}),
    # files read wrong: each converted right or rejected with its reason, the count invariant intact
    Case("csv_duplicate_header", {"d.csv": b"instruction,output,output\nq1,same,same\nq2,first,second\n"},
         ["{in}/d.csv", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, "more than once",
         counts=(2, 1, 1, 0), reasons={"invalid_csv": 1},
         outputs=[[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "same"}]]),
    Case("json_one_pretty_object", {"one.json": json.dumps(_row("Hi?", "Hello!"), indent=2).encode()},
         ["{in}/one.json", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(1, 1, 0, 0),
         outputs=[_row("Hi?", "Hello!")["messages"]]),
    Case("jsonl_pretty_array", {"arr.jsonl": json.dumps([_row("a?", "A"), _row("b?", "B")], indent=4).encode()},
         ["{in}/arr.jsonl", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(2, 2, 0, 0),
         outputs=[_row("a?", "A")["messages"], _row("b?", "B")["messages"]]),
    Case("jsonl_cr_only_line_ends", {"cr.jsonl": _jsonl(_row("1?", "one"), _row("2?", "two"), _row("3?", "three"), end="\r")},
         ["{in}/cr.jsonl", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(3, 3, 0, 0)),
    Case("json_cr_only_line_ends", {"cr.json": json.dumps([_row("1?", "one"), _row("2?", "two")], indent=1).replace("\n", "\r").encode()},
         ["{in}/cr.json", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(2, 2, 0, 0)),
    Case("csv_cr_only_line_ends", {"cr.csv": b"instruction,output\r1?,one\r2?,\"two\rlines\"\r"},
         ["{in}/cr.csv", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(2, 2, 0, 0),
         outputs=[[{"role": "user", "content": "1?"}, {"role": "assistant", "content": "one"}],
                  [{"role": "user", "content": "2?"}, {"role": "assistant", "content": "two\rlines"}]]),
    Case("csv_unterminated_quote", {"q.csv": b'instruction,output\n"broken,x\nq2,a2\nq3,a3\n'},
         ["{in}/q.csv", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, counts=(3, 2, 1, 0),
         reasons={"invalid_csv": 1}),
    Case("utf16_le_bom", {"u.jsonl": b"\xff\xfe" + _jsonl(_row("你好？", "你好！"), _row("é?", "è")).decode().encode("utf-16-le")},
         ["{in}/u.jsonl", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(2, 2, 0, 0),
         outputs=[_row("你好？", "你好！")["messages"], _row("é?", "è")["messages"]]),
    Case("utf16_be_bom_csv", {"u.csv": "\ufeffinstruction,output\r\n日本?,東京\r\n".encode("utf-16-be")},
         ["{in}/u.csv", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(1, 1, 0, 0),
         outputs=[[{"role": "user", "content": "日本?"}, {"role": "assistant", "content": "東京"}]]),
    Case("utf32_le_bom_json", {"u.json": "\ufeff".encode("utf-32-le") + json.dumps([_row("ß?", "ss")], ensure_ascii=False).encode("utf-32-le")},
         ["{in}/u.json", "--out", "{tmp}/out.jsonl", *REPORT], 0, counts=(1, 1, 0, 0),
         outputs=[_row("ß?", "ss")["messages"]]),
    Case("zero_width_reply", {"z.jsonl": GOOD + _jsonl(_row("q?", "\u200b\ufeff\u200d"))},
         ["{in}/z.jsonl", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, counts=(3, 2, 1, 0),
         reasons={"empty_content": 1}),
    # crashes: one bad row is one reject
    Case("huge_int_jsonl", {"b.jsonl": GOOD + b'{"messages": [], "n": ' + BIG.encode() + b"}\n"},
         ["{in}/b.jsonl", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, "", counts=(3, 2, 1, 0),
         reasons={"invalid_json": 1}),
    Case("huge_int_json_array", {"b.json": b"[" + GOOD.replace(b"\n", b",") + b'{"n": ' + BIG.encode() + b"}]"},
         ["{in}/b.json", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, counts=(3, 2, 1, 0),
         reasons={"invalid_json": 1}),
    Case("huge_int_csv_cell", {"b.csv": ("id,messages\nr1," + _csv_cell(json.dumps(_row("a", "b")["messages"]))
                                         + "\nr2," + _csv_cell('[{"role": "user", "content": ' + BIG + "}]") + "\n").encode()},
         ["{in}/b.csv", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, counts=(2, 1, 1, 0), reasons={"invalid_json": 1}),
    Case("deep_nesting_csv_cell", {"d.csv": ("id,conversations\nr1," + _csv_cell(DEEP) + "\n").encode()
                                   + ("r2," + _csv_cell(json.dumps(_row("a", "b")["messages"])) + "\n").encode()},
         ["{in}/d.csv", "--out", "{tmp}/out.jsonl", *REPORT, *ALL], 0, counts=(2, 1, 1, 0), reasons={"invalid_json": 1}),
]


def _fill(arg: str, tmp: Path) -> str:
    return arg.replace("{in}", str(tmp / "in")).replace("{tmp}", str(tmp))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _convert(args: list, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftflow.cli", "convert", *args], capture_output=True, timeout=timeout,
                          cwd=cwd or REPO)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_convert_bad_data_table(tmp_path, case: Case):
    (tmp_path / "in").mkdir()
    for name, data in case.files.items():
        (tmp_path / "in" / name).write_bytes(data)
    if case.setup:
        case.setup(tmp_path)
    before = _digest(tmp_path / "in")
    proc = _convert([_fill(a, tmp_path) for a in case.args])
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == case.status, err
    assert case.says in err
    assert "Traceback" not in err
    assert _digest(tmp_path / "in") == before  # inputs unchanged, whatever happened
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # no temporary file left
    if case.one_line:
        assert len(err.strip().splitlines()) == 1, err
    if case.setup is _out_links_elsewhere:
        assert (tmp_path / "out.jsonl").is_symlink() and (tmp_path / "keep.jsonl").read_text() == "precious\n"
    if case.setup is _out_is_read_only:
        assert (tmp_path / "out.jsonl").read_text() == "kept\n"
    if case.setup is _out_is_device:
        assert stat.S_ISCHR((tmp_path / "out.jsonl").lstat().st_mode)
    if case.setup is _out_is_dir:
        assert (tmp_path / "out.jsonl").is_dir()
    if case.counts is not None:
        report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
        got = (report["rows_in"], report["rows_out"], report["rejected"], report["duplicates"])
        assert got == case.counts and got[0] == sum(got[1:])
        assert report["by_reason"] == case.reasons
    if case.outputs is not None:
        lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["messages"] for line in lines] == case.outputs


def test_csv_unterminated_quote_rejects_one_line_and_reads_on(tmp_path):
    """The quote opened on line 2 swallows the rest of the file for a plain CSV reader; here only
    line 2 is rejected and the records after it are converted as written."""
    src = tmp_path / "q.csv"
    src.write_text('instruction,output\n"broken,x\nq2,a2\n"q3\nstill q3",a3\n')
    proc = _convert([str(src), "--out", str(tmp_path / "o.jsonl"), "--max-reject-fraction", "1"])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line)["messages"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows == [[{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
                    [{"role": "user", "content": "q3\nstill q3"}, {"role": "assistant", "content": "a3"}]]
    rejects = [json.loads(line) for line in (tmp_path / "o.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"], r["raw"]) for r in rejects] == [(1, "invalid_csv", '"broken,x')]
    assert "line 2" in rejects[0]["message"]
    assert list(_csv.reader(['"broken,x\n', "q2,a2\n"])) == [["broken,x\nq2,a2\n"]]  # what a plain reader makes of it


def test_non_utf8_file_name_is_read_and_reported_readably(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9.jsonl"
    with open(name, "wb") as f:
        f.write(GOOD + b'{"messages": "not a list"}\n')
    out = tmp_path / "o.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ftflow.cli", "convert", name, "--out", str(out), "--report",
                           str(tmp_path / "r.json"), "--max-reject-fraction", "1"], capture_output=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    samples = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [s["source"] for s in samples] == ["caf\\xe9.jsonl:1", "caf\\xe9.jsonl:2"]
    reject = json.loads((tmp_path / "o.rejects.jsonl").read_text(encoding="utf-8"))
    assert reject["file"].endswith("caf\\xe9.jsonl") and reject["reason"] == "wrong_type"
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["inputs"][0].endswith("caf\\xe9.jsonl") and report["rows_in"] == 3


def test_killed_convert_leaves_temp_files_that_the_next_run_removes(tmp_path):
    """SIGKILL a convert while it writes: its `.tmp-*` files stay (the outputs never appear half
    written); the next run removes exactly those, not another live process's nor other files."""
    from tasks.convert import _HOST

    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(400_000):
            f.write(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ftflow.cli", "convert", str(src), "--out", str(out), "--report",
                             str(out_dir / "r.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(out_dir.glob(".tmp-o.jsonl*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in out_dir.glob(".tmp-*"))
    assert left and all(f"{_HOST}-{proc.pid}-" in name for name in left), left
    assert not out.exists() and not (out_dir / "r.json").exists()
    # what must survive: a live process's temp file (this test's pid), another file's, a look-alike folder
    live = out_dir / f".tmp-o.jsonl.ftflow-{_HOST}-{os.getpid()}-abcd1234"
    other = out_dir / f".tmp-notes.jsonl.ftflow-{_HOST}-{proc.pid}-abcd1234"
    folder = out_dir / f".tmp-o.jsonl.ftflow-{_HOST}-{proc.pid}-dir12345"
    live.write_text("live")
    other.write_text("other")
    folder.mkdir()
    legacy_old = out_dir / ".tmp-o.jsonl-k2j4h5g6"  # converter version 1's name, no pid: removed once a day old
    legacy_new = out_dir / ".tmp-r.json-a1b2c3d4"
    legacy_old.write_text("old")
    legacy_new.write_text("recent")
    os.utime(legacy_old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    small = tmp_path / "small.jsonl"
    small.write_bytes(GOOD)
    again = _convert([str(small), "--out", str(out), "--report", str(out_dir / "r.json")])
    assert again.returncode == 0, again.stderr
    assert "removed" in again.stderr.decode() and "left by a killed convert" in again.stderr.decode()
    assert sorted(p.name for p in out_dir.glob(".tmp-*")) == sorted([live.name, other.name, folder.name, legacy_new.name])
    assert len(out.read_text().splitlines()) == 2
# ----------------------------------------------------------------------------- config cases (issue #17)
# Each through `ftflow run` in a subprocess: exit 2, one `error:` message naming the key or path and
# the fix, no traceback, bounded output, and nothing started (no run folder under FTFLOW_HOME).


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\ndata: {train: *a8}\ntrain: {seed: *a8}\n"


DEMO = str(REPO / "configs" / "demo.yaml")
ZERO_INT = json.dumps({"zero_optimization": 3})
CONFIG_CASES = [
    # (id, argv builder(tmp) -> (argv, extra env), message fragments)
    ("set-unclosed-list", lambda t: ([DEMO, "--set", "train.seed=[1,"], {}),
     ["--set 'train.seed=[1,'", "is not valid YAML"]),
    ("config-is-a-folder", lambda t: ([str(REPO / "configs")], {}),
     ["is a folder; pass a pipeline YAML file"]),
    ("config-not-utf8", lambda t: ([str(_write(t / "c.yaml", "data: {train: [caf\u00e9]}\n".encode("latin-1")))], {}),
     ["is not UTF-8 text (byte 0xe9", "save it as UTF-8"]),
    ("config-name-not-utf8", lambda t: ([os.fsdecode(bytes(t) + b"/\xff.yaml")], {}),
     ["\\udcff.yaml does not exist"]),
    ("deepspeed-folder", lambda t: ([DEMO, "--set", f"train.deepspeed={t}"], {}),
     ["train.deepspeed:", "is a folder, not a DeepSpeed JSON file"]),
    ("deepspeed-list", lambda t: ([DEMO, "--set", f"train.deepspeed={_write(t / 'l.json', '[1]')}"], {}),
     ["train.deepspeed:", "holds a JSON list"]),
    ("deepspeed-zero-int", lambda t: ([DEMO, "--set", f"train.deepspeed={_write(t / 'z.json', ZERO_INT)}"], {}),
     ["train.deepspeed:", '"zero_optimization" must be an object']),
    ("ftflow-home-is-a-file", lambda t: ([DEMO], {"FTFLOW_HOME": str(_write(t / "homefile", "x"))}),
     ["FTFLOW_HOME=", "is a file, not a folder"]),
    ("yaml-alias-bomb", lambda t: ([str(_write(t / "bomb.yaml", _alias_bomb()))], {}),
     ["'data.train.0': Input should be a valid string", "more problems"]),
    ("model-relative-path-missing",
     lambda t: ([str(_write(t / "proj" / "c.yaml", "data: {train: [../d.jsonl]}\nmodel: {name_or_path: ../models/nope}\n"))], {}),
     ["model.name_or_path: ../models/nope does not exist (resolved to", "models/nope)"]),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_cli_config_problem_is_one_message(tmp_path, case):
    _, build, fragments = case
    argv, extra = build(tmp_path)
    home = tmp_path / "home"
    env = {**os.environ, "FTFLOW_HOME": str(home), **extra}
    out = subprocess.run([sys.executable, "-m", "ftflow.cli", "run", *argv], capture_output=True, timeout=120, env=env)
    stderr = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 2, stderr[-3000:]
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    assert len(out.stdout) + len(out.stderr) < 4000  # never the input echoed back (the bomb expands to 9**9 items)
    for frag in fragments:
        assert frag in stderr, stderr
    assert not (home / "runs").exists()


def test_cli_model_relative_path_is_read_from_the_config_folder(tmp_path, tiny_model_dir):
    """`model.name_or_path: ../models/m` names a folder next to the config's folder, wherever ftflow runs."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "m")
    _write(tmp_path / "d.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    cfg = _write(tmp_path / "proj" / "c.yaml", "data: {train: [../d.jsonl]}\nmodel: {name_or_path: ../models/m}\n"
                 "train: {deepspeed: null, nproc_per_node: 1}\n")
    loaded = load_config(cfg)
    assert loaded.model.name_or_path == str(tmp_path / "models" / "m")
    check(loaded)  # preflight reads the resolved folder: weights, template, context all found
