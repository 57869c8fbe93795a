"""Data stage: input files → canonical chat JSONL, validated, nothing lost.

Every input row ends in exactly one place: `train.jsonl` / `eval.jsonl`, or `rejects.jsonl` with a
reason code. `rows_in = rows_out + rejected + duplicates` is asserted at the end of every run.

Canonical sample, one JSON object a line (UTF-8, not ASCII-escaped):
    {"id": "...", "messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "meta"?: {...}, "source": "a.jsonl:12"}
    {"id": "...", "text": "...", "meta"?: {...}, "source": "..."}   raw text, objective pretrain only
`meta` holds the row's fields that the format does not read (`type`, `category`, an empty `tools`,
...), as they were: nothing is dropped. `id` is the input's `id` field (string or integer) when
present, else the first 16 hex digits of the sha256 of the sample's `messages` (or `text`) JSON
exactly as written in the line, followed by "\n" and its `meta` JSON when it has one. U+0085,
U+2028 and U+2029 are written as JSON escapes, so readers that split lines with str.splitlines()
see one sample a line.

Inputs: files, folders (every supported file inside, recursively, hidden files skipped), globs, a
`datasets` `save_to_disk` folder, and `hf:NAME[:SPLIT]` for `datasets.load_dataset(NAME, split=SPLIT
or "train", streaming=True)` (a hub id or a local dataset folder; offline works from the cache).
    .jsonl .ndjson   one object a line                   rejects say "line"
    .json            an array of objects (streamed), one or more pretty-printed objects, or JSONL
                     (a .jsonl holding an array or pretty-printed objects is read as such too)
                                                         "line" where the element starts
    .csv .tsv        header + records; `messages`, `conversations` and `history` cells hold JSON
                                                         "row": record number, header not counted
    .parquet         read a batch at a time              "row": 1-based row number
    .gz of the text formats.
Text files are UTF-8, or UTF-16/UTF-32 with a BOM; lines end in \n, \r\n or \r. One bad row is
one reject: bytes that do not decode, JSON that does not parse, integers over 4,300 digits,
nesting too deep. A CSV record that runs over several lines and does not parse (an unterminated
quote) is rejected by its first line and reading goes on with the next; a column named twice in
the header is read when its cells agree, else the row is rejected.

Formats, detected per file from the first row with known fields, or forced with `fmt`:
    messages  {"messages": [{"role", "content"}], "system"?}             Qwen2 / OpenAI (seed 003)
    sharegpt  {"conversations": [{"from", "value"}], "system"?}         Qwen, BELLE (seeds 000, 002)
    alpaca    {"instruction", "input"?, "output", "system"?, "history"?}  seed 004
              {"instruct", "input"?, "label"}                            seed 001
    text      {"text"}                                                  objective pretrain only
Roles: system, user, assistant; `human` → user and `gpt` → assistant (any case). Turn items may use
`role`/`content` or `from`/`value` in both chat formats. A `system` field becomes the first message
(a different first system message is `conflicting_system`).
Alpaca prompts keep the join each seed trains with: `instruction` + "\n" + `input` (seed 004's
prompt puts input on its own line); `instruct` + `input` with nothing between (seed 001 concatenates,
its instructions end in "："). An empty part is left out. `history` is [[user, assistant], ...].

Data ftflow does not train yet is rejected with a reason that names it (and the message says what
to do), never trained without the part it would drop:
    unsupported_preference_pair  `chosen`/`rejected` (any shape), `preferred_output`/`non_preferred_output`
    unsupported_kto_label        a boolean `label` (or `kto_tag`)
    unsupported_images / _videos / _audios   non-empty `images`, `videos`, `audios`; an image content part
    unsupported_tools            non-empty `tools` / `functions` (a JSON string or a list)
    unsupported_tool_call        function_call / observation / tool turns, `tool_calls`, `tool_call_id`
    unsupported_message_field    any other non-null message key than role/content (from/value), e.g. `weight`

Validation, reason codes in rejects.jsonl (`{"file", "line"|"row", "reason", "message", "raw"}`):
    invalid_utf8 invalid_json invalid_csv wrong_type missing_field unknown_role format_mismatch
    system_not_first empty_content roles_not_alternating no_assistant_turn last_turn_not_assistant
    duplicate_id (an input id already used by a different sample), conflicting_system, unsupported_*
`empty_content`: nothing visible (whitespace, zero-width characters, BOMs: Unicode Cf).
Exact duplicates (same canonical messages/text and meta, whatever the id) are dropped, written to
rejects.jsonl with reason `duplicate` and counted in `duplicates` only, not in `rejected`. Eval
inputs are read first, so a sample in both keeps its eval copy and cannot leak into training.

Outputs are refused before anything is read when one is an input (by any spelling, a symbolic or
hard link) or exists and is not a regular file (a folder, FIFO, device, symbolic link) or is
read-only. They are
written to `.tmp-NAME.ftflow-HOST-PID-*` files and renamed into place; `report.json` is written
last and a failed run leaves no train.jsonl, eval.jsonl or report.json behind. The next run
removes the temporary files of a killed one (same names, this host, process gone; version 1's
`.tmp-NAME-XXXXXXXX` once unmodified for a day).
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import time
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np


log = logging.getLogger("ftflow")

CONVERTER_VERSION = 2  # bump when the canonical output of the same input changes
FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
OBJECTIVES = ("sft", "pretrain")
POLICIES = ("quarantine", "raise")
REASONS = (
    "invalid_utf8", "invalid_json", "invalid_csv", "wrong_type", "missing_field", "unknown_role",
    "format_mismatch", "system_not_first", "empty_content", "roles_not_alternating",
    "no_assistant_turn", "last_turn_not_assistant", "duplicate_id", "conflicting_system",
    "unsupported_preference_pair", "unsupported_kto_label", "unsupported_images", "unsupported_videos",
    "unsupported_audios", "unsupported_tools", "unsupported_tool_call", "unsupported_message_field",
)  # fmt: skip
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
CANONICAL_FIELDS = (
    "id", "messages", "conversations", "instruction", "instruct", "input", "output", "label",
    "system", "history", "text",
)  # fmt: skip
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
BATCH = 4096  # rows per dedup lookup and per write
_CHUNK = 1 << 20  # JSON array read size
_BOM = b"\xef\xbb\xbf"
_esc = json.encoder.encode_basestring  # C version: a JSON string literal, not ASCII-escaped
_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of non-UTF-8 bytes
# Legal unescaped in JSON, but str.splitlines() (and JavaScript) end a line there: written as \u escapes.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _escape_breaks(text: str) -> str:
    return _LINE_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class DataError(ValueError):
    """Bad data or a failed data policy; the message names the file, line/row and what to do."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class OutputError(DataError):
    """An output could not be written (disk full, permissions); names the file and what to do."""


class InputError(DataError):
    """An input that cannot be read at all: missing, unsupported type, corrupt (CLI exit status 2)."""


class _Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class ConvertResult:
    train_path: Path
    eval_path: Path
    rejects_path: Path
    report_path: Path
    report: dict


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Input:
    label: str  # what reports and rejects call it: the path, or hf:NAME
    name: str  # the name in each sample's `source`
    kind: str  # jsonl json csv tsv parquet hf_disk hf_load
    path: Path | None = None
    split: str | None = None
    hf_name: str | None = None  # for datasets.load_dataset

    def __post_init__(self) -> None:  # a file name need not be UTF-8: reports show its bad bytes as \xNN
        self.label, self.name = _printable(self.label), _printable(self.name)

    @property
    def locator(self) -> str:
        return "line" if self.kind in ("jsonl", "json") else "row"


def _kind_of(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        return SUFFIXES.get(suffixes[-1].lower()) if suffixes and suffixes[-1].lower() != ".parquet" else None
    return SUFFIXES.get(path.suffix.lower())


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def resolve_inputs(inputs: list[str | Path], exclude: tuple[Path, ...] = ()) -> list[_Input]:
    """Expand files, folders, globs and `hf:` names into the inputs read, in a stable order."""
    found: list[_Input] = []
    skip = {p.resolve() for p in exclude}
    for item in inputs:
        spec = str(item)
        if spec.startswith("hf:"):
            name, split = spec[3:], None
            m = re.fullmatch(r"(.+):([\w.\-\[\]%+]+)", name)
            if m and not Path(name).expanduser().exists():
                name, split = m.group(1), m.group(2)
            local = Path(name).expanduser()
            if local.exists():
                kind = "hf_disk" if local.is_dir() and _is_saved_dataset(local) else "hf_load"
                found.append(_Input(spec, local.name, kind, local, split, str(local)))
            else:
                found.append(_Input(spec, name, "hf_load", None, split, name))
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                found.append(_Input(str(path), path.name, "hf_disk", path))
                continue
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and _kind_of(p) and p.resolve() not in skip
                and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
            )  # fmt: skip
            if not files:
                raise InputError(f"folder {path} holds no supported data files ({', '.join(SUFFIXES)}, or .gz of them)")
            found += [_Input(str(p), p.relative_to(path).as_posix(), _kind_of(p), p) for p in files]
        elif path.is_file():
            kind = _kind_of(path)
            if kind is None:
                raise InputError(
                    f"{path}: unsupported file type; use {', '.join(SUFFIXES)} (or .gz of the text ones), "
                    "or a folder, a glob or hf:NAME"
                )
            found.append(_Input(str(path), path.name, kind, path))
        elif path.exists():  # a FIFO, a device, a socket: reading it could block or never end
            kind = _not_regular(path.stat().st_mode)
            raise InputError(f"input {_printable(spec)} is a {kind}; give a regular file, a folder, a glob or hf:NAME")
        elif glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
            files = [p for p in matches if p.is_file() and _kind_of(p) and p.resolve() not in skip]
            if not files:
                raise InputError(f"glob {spec} matches no supported data files ({', '.join(SUFFIXES)})")
            found += [_Input(str(p), p.name, _kind_of(p), p) for p in files]
        else:
            raise InputError(f"input {spec} does not exist (relative paths are read from {Path.cwd()})")
    unique: dict[str, _Input] = {}
    for inp in found:  # a file named twice would make every row of its second reading a duplicate
        key = str(inp.path.resolve()) if inp.path is not None and inp.path.exists() else inp.label
        unique.setdefault(key, inp)
    return list(unique.values())


# ----------------------------------------------------------------------------- readers
# Each yields (number, raw, row): `raw` is the line text for JSONL, the element text for a JSON
# element that does not parse, else None (rejects then show the row object); `row` is the parsed
# object, or a _Reject when the row could not even be read.


_UTF_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"),
)  # fmt: skip
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def _bad_bytes(e: UnicodeDecodeError) -> tuple[str, int]:
    """Decoding error handler: each undecodable byte becomes U+DCFF, which surrogateescape writes
    back as the byte 0xFF, so the row holding it is rejected as not UTF-8 (never the whole file)."""
    return "\udcff" * (e.end - e.start), e.end


codecs.register_error("ftflow-bad-bytes", _bad_bytes)


class _Recoded:
    """A UTF-16/UTF-32 file (found by its BOM) read as UTF-8 bytes, so every reader below sees UTF-8.

    Lines end at \\n, \\r\\n or \\r (`newline=""`), as in `_lines`. Text that does not decode is
    rejected row by row (`_bad_bytes`)."""

    def __init__(self, raw, encoding: str):
        self.encoding = encoding
        self.text = io.TextIOWrapper(raw, encoding=encoding, errors="ftflow-bad-bytes", newline="")

    def read(self, n: int = -1) -> bytes:
        return self.text.read(n).encode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[bytes]:
        for line in self.text:
            yield line.encode("utf-8", "surrogateescape")

    def __enter__(self) -> "_Recoded":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.text.close()


def _open(path: Path):
    """The file's bytes (gunzipped), as UTF-8: a UTF-16/32 BOM selects a transcoding reader."""
    f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    try:
        head = f.peek(4)[:4]
    except BaseException:
        f.close()
        raise
    for bom, encoding in _UTF_BOMS:
        if head.startswith(bom):
            f.read(len(bom))
            return _Recoded(f, encoding)
    return f


def _lines(f) -> Iterator[bytes]:
    """Physical lines of a byte stream, ending at \\n, \\r\\n or a lone \\r (classic Mac files),
    each with its line break. A JSON text holds no unescaped line break inside a string, so a
    lone CR only ever separates rows; CSV quotes keep theirs (the csv module joins the lines)."""
    for b in f:
        cr = b.find(b"\r")
        if cr < 0 or (cr == len(b) - 2 and b[-1:] == b"\n"):
            yield b
        else:
            yield from _LINE.findall(b)


def _printable(text: str) -> str:
    """Text decoded with surrogateescape, with its bad bytes shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _number_error(e: ValueError) -> str:
    """The message for a ValueError of the json module that is not a syntax error (a huge integer)."""
    if "4300" in str(e) or "digits" in str(e):
        return f"a number with more than {sys.get_int_max_str_digits()} digits; write it as a string"
    return str(e)


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, Any]]:
    scan = json.JSONDecoder().scan_once  # the C scanner: json.loads less its wrapper (0.6 vs 1.4 µs a row)
    loads = json.loads
    with _open(path) as f:
        n = 0
        for physical in f:
            # a lone CR ends a line too (classic Mac files); inlined, as a generator step costs 8%
            if b"\r" in physical and (physical[-2:] != b"\r\n" or b"\r" in physical[:-2]):
                parts = _LINE.findall(physical)
            else:
                parts = (physical,)
            for b in parts:
                n += 1
                if n == 1 and b.startswith(_BOM):
                    b = b[3:]
                try:
                    s = b.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, b.rstrip(b"\r\n").decode("utf-8", "backslashreplace"), _Reject(
                        "invalid_utf8", f"bytes {e.start}-{e.end} are not UTF-8; re-save the file as UTF-8"
                    )
                    continue
                try:
                    try:
                        row, end = scan(s, 0)
                        if end != len(s) and not s[end:].isspace():
                            raise ValueError("extra data")
                    except (StopIteration, ValueError):  # leading blanks or an error: loads says which
                        row = loads(s)
                    yield n, s, row
                except json.JSONDecodeError as e:
                    if s.strip():  # blank lines are not rows
                        yield n, s, _Reject("invalid_json", f"{e.msg} at column {e.colno}")
                except ValueError as e:  # an integer longer than sys.get_int_max_str_digits()
                    yield n, s, _Reject("invalid_json", _number_error(e))
                except RecursionError:
                    yield n, s, _Reject("invalid_json", "nested too deeply")


_WS = re.compile(r"[ \t\r\n]*")
_SCAN = re.compile(r'[{}\[\]",]')
_IN_STR = re.compile(r'["\\]')


def _element_end(buf: str, pos: int) -> int | None:
    """End of the array element starting at `pos`, by brackets and strings only (for text that
    does not parse), or None when it is not complete in `buf`."""
    depth, i = 0, pos
    while True:
        m = _SCAN.search(buf, i)
        if m is None:
            return None
        ch, i = m.group(), m.end()
        if ch == '"':
            while True:
                s = _IN_STR.search(buf, i)
                if s is None:
                    return None
                i = s.end() + (1 if s.group() == "\\" else 0)
                if s.group() == '"':
                    break
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i
            if depth < 0:  # the array's own "]": the element ended before it
                return m.start()
        elif depth == 0:  # "," between elements
            return m.start()


def _json_layout(path: Path, kind: str) -> str:
    """How a .json / .jsonl file holds its rows: "array", "values" (objects one after another,
    pretty-printed: one object in a .json file is the common case) or "lines" (JSONL).

    The first line decides: a line that parses alone means JSONL (whatever the suffix); a `[`
    opens an array; an object that runs over several lines means pretty-printed values. A .json
    file that starts with `[` is an array."""
    with _open(path) as f:
        head = f.read(_CHUNK)
    text = head.decode("utf-8", "replace").lstrip("\ufeff")
    body = text.lstrip(" \t\r\n")
    if not body:
        return "lines"
    if kind == "json" and body[0] == "[":
        return "array"
    first = re.split(r"\r\n|\r|\n", body, maxsplit=1)[0]
    try:
        json.loads(first)
        return "lines"
    except (ValueError, RecursionError):
        pass
    if body[0] in "[{":  # a value over several lines: pretty-printed
        layout = "array" if body[0] == "[" else "values"
        if first.strip() == body[0]:
            return layout
        try:
            _, end = json.JSONDecoder().raw_decode(body)
            return layout if end > len(first) else "lines"
        except (ValueError, RecursionError):
            pass
    return "lines"


def _read_json(path: Path, kind: str = "json") -> Iterator[tuple[int, Any, Any]]:
    """A .json or .jsonl file, laid out as `_json_layout` finds: JSONL line by line, an array or
    a run of pretty-printed objects streamed a value at a time.

    Values are parsed with `raw_decode` over a sliding buffer. A value that does not parse is
    delimited by its brackets and rejected on its own; separators are read leniently (a missing
    or trailing comma loses nothing).
    """
    layout = _json_layout(path, kind)
    if layout == "lines":
        yield from _read_jsonl(path)
        return
    array = layout == "array"
    with _open(path) as f:
        first = f.read(_CHUNK)
        # line ends \r\n and \r read as \n (JSON has no raw CR inside strings), so lines count right
        decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")("surrogateescape"), translate=True)
        buf = decoder.decode(first).lstrip("\ufeff")
        bad_bytes = bool(_BAD_BYTES.search(buf))
        pos = buf.index("[") + 1 if array else 0
        line = 1 + buf.count("\n", 0, pos)
        eof = False
        raw_decode = json.JSONDecoder().raw_decode
        want = _CHUNK

        def refill() -> None:
            nonlocal buf, pos, eof, bad_bytes
            block = f.read(want)
            text = decoder.decode(block, final=not block)
            eof = not block
            bad_bytes = bad_bytes or bool(_BAD_BYTES.search(text))
            buf, pos = buf[pos:] + text, 0

        while True:
            end = _WS.match(buf, pos).end()
            line += buf.count("\n", pos, end)
            pos = end
            if pos >= len(buf):
                if eof:
                    return  # no closing "]": every complete element was read
                refill()
                continue
            ch = buf[pos]
            if ch == ",":
                pos += 1
                continue
            if ch == "]" and array:  # the end; anything after it but blanks would be lost, so say so
                while not (rest := buf[pos + 1 :].strip()) and not eof:
                    refill()
                if rest:
                    raise InputError(
                        f"{_printable(str(path))} line {line}: data after the array's closing ]; a .json file holds one "
                        "array, or one object a line (JSONL)"
                    )
                return
            try:
                obj, end = raw_decode(buf, pos)
                if end >= len(buf) and not eof:  # a number or literal cut at the chunk edge
                    want = max(_CHUNK, len(buf))
                    refill()
                    continue
                reject = None
            except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                end = _element_end(buf, pos)
                if end is None and not eof:  # incomplete: read more (doubling, so big rows stay linear)
                    want = max(_CHUNK, len(buf))
                    refill()
                    continue
                if end is None:  # unbalanced to the end of the file
                    end = len(buf)
                elif end <= pos:  # a stray "}" or "]"
                    end = pos + 1
                if isinstance(e, json.JSONDecodeError):
                    msg = f"{e.msg} (line {line + buf.count(chr(10), pos, e.pos)}, column {e.colno})"
                elif isinstance(e, ValueError):
                    msg = _number_error(e)
                else:
                    msg = "nested too deeply"
                obj, reject = None, _Reject("invalid_json", msg)
            want = _CHUNK
            if bad_bytes and _BAD_BYTES.search(buf, pos, end):
                message = "the element holds bytes that are not UTF-8; re-save the file as UTF-8"
                obj, reject = None, _Reject("invalid_utf8", message)
            if reject is not None:
                yield line, _printable(buf[pos:end]), reject
            else:
                yield line, None, obj
            line += buf.count("\n", pos, end)
            pos = end


_JSON_CELLS = ("messages", "conversations", "history")


class _LineSource:
    """The physical lines a csv.reader reads, with the ones of the current record kept, so that a
    record that does not parse can be given back (all but its first line) and read again."""

    def __init__(self, lines: Iterator[str]):
        self.lines, self.back, self.taken = lines, [], []

    def __iter__(self) -> "_LineSource":
        return self

    def __next__(self) -> str:
        line = self.back.pop() if self.back else next(self.lines)
        self.taken.append(line)
        return line


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, Any, Any]]:
    """Records of a CSV/TSV file; `n` counts records (the header not counted).

    Parsed strictly (a stray quote is an error, not a silently changed field). A record that runs
    over several lines and does not parse (an unterminated quote swallows the lines after it) is
    rejected by its first line alone and reading resumes on the next line, so no records merge.
    A column named twice in the header is used when its cells agree, else the row is rejected.
    """
    csv.field_size_limit(2**31 - 1)  # long conversations exceed the 128 KiB default

    def decoded(f) -> Iterator[str]:
        for i, b in enumerate(_lines(f)):
            yield (b[3:] if i == 0 and b.startswith(_BOM) else b).decode("utf-8", "surrogateescape")

    with _open(path) as f:
        src = _LineSource(decoded(f))
        reader = csv.reader(src, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            line_no = len(src.taken)  # physical lines read before the current record
        except csv.Error as e:
            raise InputError(f"{_printable(str(path))}: the header line does not parse as CSV: {e}") from None
        if header is None:
            return
        header = [h.strip() for h in header]
        columns: dict[str, list[int]] = {}
        for i, h in enumerate(header):
            columns.setdefault(h, []).append(i)
        repeated = {h: idx for h, idx in columns.items() if len(idx) > 1}
        if repeated:
            log.warning("%s: column(s) %s appear more than once in the header; rows whose cells differ are rejected",
                        _printable(str(path)), sorted(repeated))  # fmt: skip
        n = 0
        while True:
            src.taken = []
            try:
                rec, error = next(reader), None
            except StopIteration:
                return
            except csv.Error as e:
                rec, error = None, e
            taken = src.taken
            start = line_no + 1
            if rec is not None and not rec:  # a blank line
                line_no += len(taken)
                continue
            n += 1
            if len(taken) > 1 and (error is not None or len(rec) != len(header)):
                # an unterminated quote (or a bad record over several lines): reject its first line only
                src.back.extend(reversed(taken[1:]))
                reader = csv.reader(src, delimiter=delimiter, strict=True)
                line_no += 1
                why = str(error) if error is not None else f"{len(rec)} fields, the header has {len(header)}"
                message = (f"line {start}: {why}; the record does not parse over lines {start}-{start + len(taken) - 1} "
                           "(an unterminated quote?), so only its first line is rejected and reading goes on after it")  # fmt: skip
                yield n, _printable(taken[0].rstrip("\r\n")), _Reject("invalid_csv", message)
                continue
            line_no += len(taken)
            if error is not None:
                reader = csv.reader(src, delimiter=delimiter, strict=True)
                raw = _printable("".join(taken).rstrip("\r\n"))
                yield n, raw, _Reject("invalid_csv", f"line {start}: {error}")
                continue
            if any(_BAD_BYTES.search(v) for v in rec):
                message = "the record holds bytes that are not UTF-8; re-save the file as UTF-8"
                yield n, [_printable(v) for v in rec], _Reject("invalid_utf8", message)
                continue
            if len(rec) != len(header):
                message = f"{len(rec)} fields, the header has {len(header)}; quote fields that hold {delimiter!r}"
                yield n, rec, _Reject("invalid_csv", message)
                continue
            if repeated:
                differ = [h for h, idx in repeated.items() if len({rec[i] for i in idx}) > 1]
                if differ:
                    h = differ[0]
                    where = ", ".join(str(i + 1) for i in repeated[h])
                    message = (f"column {h!r} is in the header {len(repeated[h])} times (columns {where}) with "
                               "different values in this row; rename the columns so each name is used once")  # fmt: skip
                    yield n, rec, _Reject("invalid_csv", message)
                    continue
            row: dict[str, Any] = {h: rec[idx[0]] for h, idx in columns.items() if h or rec[idx[0]]}
            try:
                for key in _JSON_CELLS:
                    if isinstance(row.get(key), str) and row[key].strip():
                        row[key] = json.loads(row[key])
            except json.JSONDecodeError as e:
                yield n, rec, _Reject("invalid_json", f"cell {key!r}: {e.msg} at column {e.colno}")
                continue
            except ValueError as e:
                yield n, rec, _Reject("invalid_json", f"cell {key!r}: {_number_error(e)}")
                continue
            except RecursionError:
                yield n, rec, _Reject("invalid_json", f"cell {key!r}: nested too deeply")
                continue
            yield n, None, row


def _read_parquet(path: Path) -> Iterator[tuple[int, Any, Any]]:
    import pyarrow.parquet as pq

    n = 0
    pf = pq.ParquetFile(path)
    # pandas writes its index as __index_level_N__ columns: a row number, not data (nor meta)
    columns = [c for c in pf.schema_arrow.names if not re.fullmatch(r"__index_level_\d+__", c)]
    for batch in pf.iter_batches(batch_size=BATCH, columns=columns):
        for row in batch.to_pylist():
            n += 1
            yield n, None, row


def _read_hf(inp: _Input) -> Iterator[tuple[int, Any, Any]]:
    import datasets

    if inp.kind == "hf_disk":
        ds = datasets.load_from_disk(str(inp.path))
        if isinstance(ds, datasets.DatasetDict):
            split = inp.split or "train"
            if split not in ds:
                raise InputError(f"{inp.label} has splits {sorted(ds)}, not {split!r}; name one as hf:PATH:SPLIT")
            ds = ds[split]
        batches = (t.to_pylist() for t in ds.with_format("arrow").iter(batch_size=BATCH))
        rows: Iterator[dict] = (row for batch in batches for row in batch)
    else:
        try:
            rows = iter(datasets.load_dataset(inp.hf_name, split=inp.split or "train", streaming=True))
        except Exception as e:  # datasets raises many kinds (not found, offline, bad split)
            raise InputError(
                f"{inp.label}: datasets.load_dataset failed: {e}. Offline, a hub dataset must be in the local cache"
            ) from e
    for n, row in enumerate(rows, 1):
        yield n, None, row


def _rows(inp: _Input) -> Iterator[tuple[int, Any, Any]]:
    """The input's rows; failures to read the input itself become InputError."""
    try:
        if inp.kind in ("jsonl", "json"):
            yield from _read_json(inp.path, inp.kind)
        elif inp.kind in ("csv", "tsv"):
            yield from _read_csv(inp.path, "," if inp.kind == "csv" else "\t")
        elif inp.kind == "parquet":
            yield from _read_parquet(inp.path)
        else:
            yield from _read_hf(inp)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read {inp.label}: {e}") from e
    except Exception as e:
        if type(e).__module__.startswith("pyarrow"):  # corrupt Parquet
            raise InputError(f"cannot read {inp.label}: {e}") from e
        raise


# ----------------------------------------------------------------------------- rows → samples


_PREFERENCE_HINT = (
    "{what}: a preference pair (DPO / ORPO / reward-model data). ftflow trains supervised replies only "
    "(tokenize.objective sft) and would train the rejected reply or lose the pair. Train it with a preference "
    "trainer, or make SFT rows from the chosen replies yourself"
)
_KTO_HINT = (
    "`label` is {value}: a KTO row (a reply marked desirable or not). ftflow trains supervised replies only and "
    "would train undesirable replies as targets. Keep the rows labelled true, without `label`, for SFT, or "
    "train the set with a KTO trainer"
)
_IMAGES_HINT = (
    "{what}: a multimodal row. ftflow fine-tunes text-only models and would train the text without the "
    "media it refers to. Use a vision-language trainer, or drop these rows"
)
_TOOLS_HINT = (
    "{what}: tool (function-calling) definitions, which ftflow does not render into the prompt yet; the "
    "model would learn replies without the tools they were written for. Drop these rows, or remove `{key}` "
    "where the reply does not depend on it"
)
_TOOL_CALL_HINT = (
    "{what}: function calling (a tool call or a tool's result), which ftflow does not train yet. Drop these "
    "rows, or keep only conversations without tool turns"
)
_MEDIA = (("images", "unsupported_images"), ("image", "unsupported_images"), ("videos", "unsupported_videos"),
          ("video", "unsupported_videos"), ("audios", "unsupported_audios"), ("audio", "unsupported_audios"))  # fmt: skip
_PREFERENCE_KEYS = ("chosen", "rejected", "preferred_output", "non_preferred_output")


def _empty(value: Any) -> bool:
    """No content at all: null, "", [] or {} (also as a JSON string, as CSV cells hold them)."""
    if value is None or value == "" or value == [] or value == {}:
        return True
    return value.__class__ is str and value.strip() in ("", "[]", "{}", "null")


_FEATURE_KEYS = frozenset(("label", "kto_tag", "tools", "functions", *_PREFERENCE_KEYS, *(k for k, _ in _MEDIA)))


def _unsupported(row: dict) -> None:
    """Reject a row that carries a kind of data ftflow does not train yet, naming the feature.
    (Tool turns inside a conversation are found by `_turns`.)"""
    if _FEATURE_KEYS.isdisjoint(row):
        return
    if ("chosen" in row or "rejected" in row or "preferred_output" in row) and (
        keys := [k for k in _PREFERENCE_KEYS if k in row and not _empty(row[k])]
    ):
        what = "`" + "`, `".join(keys) + "`"
        raise _Reject("unsupported_preference_pair", _PREFERENCE_HINT.format(what=f"the row has {what}"))
    for key in ("label", "kto_tag"):
        if row.get(key).__class__ is bool:
            raise _Reject("unsupported_kto_label", _KTO_HINT.format(value=str(row[key]).lower()))
    for key, reason in _MEDIA:
        if key in row and not _empty(row[key]):
            value = row[key]
            what = f"`{key}` lists {len(value)} file(s)" if value.__class__ is list else f"the row has `{key}`"
            raise _Reject(reason, _IMAGES_HINT.format(what=what))
    for key in ("tools", "functions"):
        if key in row and not _empty(row[key]):
            for turns_key in ("messages", "conversations"):
                for i, item in enumerate(row.get(turns_key) or ()):
                    if isinstance(item, dict) and (
                        str(item.get("role", item.get("from"))).lower() in _TOOL_ROLES
                        or any(not _empty(item.get(k)) for k in _TOOL_KEYS)
                    ):
                        what = f"message {i} is a tool call or result, with `{key}` declared"
                        raise _Reject("unsupported_tool_call", _TOOL_CALL_HINT.format(what=what))
            raise _Reject("unsupported_tools", _TOOLS_HINT.format(what=f"the row declares `{key}`", key=key))


# Row fields each format reads; any other field is carried into the sample's `meta`.
_USED = {
    "messages": frozenset(("id", "messages", "system")),
    "sharegpt": frozenset(("id", "conversations", "system")),
    "alpaca": frozenset(("id", "instruction", "instruct", "input", "output", "label", "system", "history")),
    "text": frozenset(("id", "text")),
}


def _meta_json(row: dict, fmt: str) -> str | None:
    """The row's fields that `fmt` does not read, as a JSON object in input order (None when none):
    carried into the sample so that nothing is dropped, and part of its content for dedup."""
    used = _USED[fmt]
    if fmt == "alpaca" and (("instruction" in row and "instruct" in row) or ("output" in row and "label" in row)):
        # two spellings of one field: `instruction` and `output` are read, the other spelling is kept
        used = used - {k for k, read in (("instruct", "instruction"), ("label", "output")) if k in row and read in row}
    elif used.issuperset(row):
        return None
    unused = row.keys() - used
    meta = {k: v for k, v in row.items() if k in unused}
    try:
        return _escape_breaks(json.dumps(meta, ensure_ascii=False, default=_safe_json))
    except RecursionError:
        raise _Reject("invalid_json", f"field(s) {sorted(unused)} nested too deeply to carry in `meta`") from None


def _detect(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "instruct" in row or "output" in row or "label" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _text(row: dict, key: str) -> str | None:
    """An optional string field: None when absent or null."""
    value = row.get(key)
    if value is None or value.__class__ is str:
        return value
    raise _Reject("wrong_type", f"`{key}` is a {_kind(value)}, expected a string")


def _required(row: dict, key: str) -> str:
    value = _text(row, key)
    if value is None:
        raise _Reject("missing_field", f"`{key}` is {'null' if key in row else 'missing'}")
    return value


_TOOL_ROLES = ("function_call", "observation", "tool", "function", "tool_call", "tool_response", "ipython")
_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
_MESSAGE_KEYS = ("role", "content", "from", "value")
_IMAGE_PARTS = ("image", "image_url", "input_image")


def _role(item: dict, i: int) -> str:
    raw = item.get("role", item.get("from"))
    if raw is None:
        raise _Reject("missing_field", f"message {i} has no `role` (or `from`)")
    if raw.__class__ is not str:
        raise _Reject("wrong_type", f"message {i}: role is a {_kind(raw)}, expected a string")
    role = ROLES.get(raw) or ROLES.get(raw.lower())
    if role is None:
        if raw.lower() in _TOOL_ROLES:
            raise _Reject("unsupported_tool_call", _TOOL_CALL_HINT.format(what=f"message {i} is a {raw!r} turn"))
        raise _Reject("unknown_role", f"message {i}: role {raw!r} is not one of {sorted(ROLES)}")
    return role


def _turns(row: dict, key: str) -> list[tuple[str, str]]:
    items = row[key]
    if items.__class__ is not list:
        raise _Reject("wrong_type", f"`{key}` is a {_kind(items)}, expected an array of messages")
    turns = []
    for i, item in enumerate(items):
        if item.__class__ is not dict:
            raise _Reject("wrong_type", f"message {i} is a {_kind(item)}, expected an object")
        role = _role(item, i)
        if len(item) > 2:  # anything but role and content would be dropped: name it
            for k, v in item.items():
                if k in _MESSAGE_KEYS or _empty(v):
                    continue
                if k in _TOOL_KEYS:
                    raise _Reject("unsupported_tool_call", _TOOL_CALL_HINT.format(what=f"message {i} has `{k}`"))
                raise _Reject(
                    "unsupported_message_field",
                    f"message {i} has `{k}`, which ftflow does not use (a message is role and content); the row is "
                    f"not trained rather than trained without it. Remove `{k}` from the messages, or fold it into the content",
                )
        content = item.get("content", item.get("value"))
        if content is None:
            if "content" not in item and "value" not in item:
                raise _Reject("missing_field", f"message {i} has no `content` (or `value`)")
            raise _Reject("wrong_type", f"message {i}: content is null, expected a string")
        if content.__class__ is not str:
            if content.__class__ is list and any(
                isinstance(part, dict) and part.get("type") in _IMAGE_PARTS for part in content
            ):
                raise _Reject("unsupported_images", _IMAGES_HINT.format(what=f"message {i} has an image part"))
            raise _Reject("wrong_type", f"message {i}: content is a {_kind(content)}, expected a string")
        turns.append((role, content))
    if (system := _text(row, "system")) is not None and not _blank(system):
        if not (turns and turns[0][0] == "system"):
            turns.insert(0, ("system", system))
        elif turns[0][1] != system:
            raise _Reject(
                "conflicting_system",
                "the row's `system` field and its first (system) message differ; keep one of them",
            )
    return turns


def _alpaca(row: dict) -> list[tuple[str, str]]:
    if "instruction" in row:
        instruction, sep = _required(row, "instruction"), "\n"
    elif "instruct" in row:
        instruction, sep = _required(row, "instruct"), ""
    else:
        raise _Reject("missing_field", "alpaca row has no `instruction` (or `instruct`)")
    extra = _text(row, "input")
    answer = _required(row, "output") if "output" in row or "label" not in row else _required(row, "label")
    turns = []
    if system := _text(row, "system"):
        turns.append(("system", system))
    history = row.get("history")
    if history is not None:
        if history.__class__ is not list:
            raise _Reject("wrong_type", f"`history` is a {_kind(history)}, expected [[user, assistant], ...]")
        for i, pair in enumerate(history):
            if pair.__class__ is not list or len(pair) != 2 or not all(p.__class__ is str for p in pair):
                raise _Reject("wrong_type", f"history[{i}] is not a [user, assistant] pair of strings")
            turns += (("user", pair[0]), ("assistant", pair[1]))
    user = instruction + sep + extra if extra and instruction else instruction or extra or ""
    turns += (("user", user), ("assistant", answer))
    return turns


def _blank(text: str) -> bool:
    """Nothing visible: only whitespace and format characters (zero-width spaces and joiners,
    BOMs, direction marks: Unicode category Cf), which str.strip() keeps."""
    text = text.strip()
    if not text:
        return True
    first = text[0]
    return first >= "\xad" and unicodedata.category(first) == "Cf" and all(
        c.isspace() or unicodedata.category(c) == "Cf" for c in text
    )


def _check(turns: list[tuple[str, str]], sft: bool) -> None:
    """Conversation rules; the first broken one names the reject."""
    if not turns:
        raise _Reject("empty_content", "the conversation has no messages")
    last = None  # the last user/assistant role seen
    for i, (role, content) in enumerate(turns):
        if role == "system" and i:
            raise _Reject("system_not_first", f"message {i} is a system message; only the first may be")
        if _blank(content):
            what = "empty" if not content.strip() else "only invisible characters (zero-width, BOM)"
            raise _Reject("empty_content", f"message {i} ({role}) is {what}")
        if role != "system":
            if role == last or (last is None and role == "assistant"):
                after = f"a {last} message" if last else "the start"
                message = f"message {i} is {role} after {after}; turns go user, assistant, user, ..."
                raise _Reject("roles_not_alternating", message)
            last = role
    if sft and last != "assistant":
        if last is None or all(role != "assistant" for role, _ in turns):
            raise _Reject("no_assistant_turn", "no assistant message to train on (tokenize.objective: sft)")
        message = f"the last message is {turns[-1][0]}; sft trains on a final assistant reply"
        raise _Reject("last_turn_not_assistant", message)


def _row_id(row: dict) -> str | None:
    value = row.get("id")
    if value is None or value == "":
        return None
    if value.__class__ is str:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Reject("wrong_type", f"`id` is a {_kind(value)}, expected a string or an integer")


def _rename(row: dict, columns: dict[str, str]) -> dict:
    row = dict(row)
    for src, dst in columns.items():
        if src in row:
            row[dst] = row.pop(src)
    return row


def messages_json(turns: list[tuple[str, str]]) -> str:
    """`json.dumps([{"role": r, "content": c}, ...], ensure_ascii=False)`, built directly (faster),
    with U+0085, U+2028 and U+2029 escaped."""
    body = "[" + ", ".join(['{"role": "' + r + '", "content": ' + _esc(c) + "}" for r, c in turns]) + "]"
    if "\u2028" in body or "\u2029" in body or "\x85" in body:  # 3 scans beat one regex search 10x
        body = _escape_breaks(body)
    return body


def _plain_alpaca(row: dict, prefix: str) -> str | None:
    """Messages JSON of the common alpaca row (instruction, input, output strings; no system or
    history), or None for the general path. Same result as _alpaca + _check + messages_json, at
    a third of the cost; `prefix` opens the array up to the user content (with the system prompt)."""
    instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input")
    if (
        instruction.__class__ is not str or output.__class__ is not str
        or not (i := instruction.strip()) or not (o := output.strip())
        or (i[0] >= "\xad" and _blank(i)) or (o[0] >= "\xad" and _blank(o))
        or (extra is not None and extra.__class__ is not str) or "system" in row or "history" in row
    ):  # fmt: skip
        return None
    user = instruction + "\n" + extra if extra else instruction
    body = prefix + _esc(user) + '}, {"role": "assistant", "content": ' + _esc(output) + "}]"
    if "\u2028" in body or "\u2029" in body or "\x85" in body:
        body = _escape_breaks(body)
    return body


# ----------------------------------------------------------------------------- dedup


class _SeenSet:
    """A set of 64-bit keys kept as sorted numpy runs: 8 bytes a key (a Python set of ints costs ~70).

    Runs merge like a binary counter (a stable sort of two sorted runs is a linear merge), so a
    lookup searches at most log2(N / BATCH) runs.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def contains(self, keys: np.ndarray) -> list[bool]:
        hit = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            idx = np.searchsorted(run, keys)
            np.minimum(idx, len(run) - 1, out=idx)
            hit |= run[idx] == keys
        return hit.tolist()

    def add(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        run = np.sort(keys)
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate((self._runs.pop(), run)), kind="stable")
        self._runs.append(run)


def _keys(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=np.uint64)


# ----------------------------------------------------------------------------- the run


_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
_TMP_TAG = ".ftflow-"  # .tmp-NAME.ftflow-HOST-PID-RANDOM: a temporary output of this module
_LEGACY_TMP_AGE_S = 24 * 3600  # .tmp-NAME-RANDOM (converter version 1) untouched this long: left by a killed run


class _Out:
    """A temporary output file that hashes what it writes and is renamed into place at the end.

    The temporary file is `.tmp-NAME.ftflow-HOST-PID-XXXXXXXX` beside the output: a convert that
    is killed leaves it, and a later run removes it once that process is gone (`_remove_stale`)."""

    def __init__(self, final: Path):
        self.final = final
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}{_TMP_TAG}{_HOST}-{os.getpid()}-", dir=final.parent)
        except OSError as e:
            raise OutputError(f"cannot write in {_printable(str(final.parent))}: {e.strerror or e}; "
                              "write the output elsewhere") from None  # fmt: skip
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.sha = hashlib.sha256()
        self.rows = 0

    @classmethod
    def write_text(cls, path: Path, text: str) -> None:
        """`text` written atomically to `path` (a name the user gave may hold any bytes: kept escaped)."""
        out = cls(path)
        try:
            out.write([text.encode("utf-8", "backslashreplace")])
        except BaseException:
            out.discard()
            raise
        out.commit()

    def write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        try:
            self.file.write(data)
        except OSError as e:
            raise self._error(e) from None
        self.sha.update(data)
        self.rows += len(lines)

    def commit(self) -> str:
        try:
            self.file.close()
            try:
                kind = _not_regular(os.lstat(self.final).st_mode)
            except FileNotFoundError:
                kind = None
            if kind is not None:  # appeared since the check: never replace anything but a regular file
                self.discard()
                raise OutputError(f"{_printable(str(self.final))} is now a {kind}; it was not replaced. Remove it or "
                                  "write elsewhere, then re-run")  # fmt: skip
            os.replace(self.tmp, self.final)
        except OSError as e:
            raise self._error(e) from None
        return self.sha.hexdigest()

    def discard(self) -> None:
        try:
            self.file.close()  # flushing a half-written buffer can fail again (disk full): the file goes anyway
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def _error(self, e: OSError) -> "OutputError":
        self.discard()
        return OutputError(
            f"could not write {_printable(str(self.final))}: {e.strerror or e} (errno {e.errno}). Nothing was replaced: the "
            f"partial file was removed. Free space on that disk or write elsewhere (FTFLOW_HOME, --out), then re-run."
        )


def _not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is, in words; None for a regular file."""
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "special file"


def _check_outputs(outputs: dict[str, Path], inputs: list[_Input]) -> None:
    """Refuse, before anything is read, an output that is one of the inputs (by any spelling, a
    link or a hard link) or that exists and is not a regular file. Raises InputError."""
    read: dict[tuple[int, int], str] = {}
    for inp in inputs:
        if inp.path is None:
            continue
        try:
            st = os.stat(inp.path)
        except OSError:
            continue
        read[(st.st_dev, st.st_ino)] = inp.label
    named: dict[str, str] = {}
    for what, path in outputs.items():
        shown = f"{what} {_printable(str(path))}"
        real = os.path.realpath(path)
        if real in named:
            raise InputError(f"{shown} is the same file as {named[real]}; give each output its own path")
        named[real] = shown
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise InputError(f"{shown}: cannot check it ({e.strerror or e}); give another output path") from None
        try:
            st = os.stat(path)
            same = read.get((st.st_dev, st.st_ino))
        except OSError:
            same = None
        if same is not None:
            raise InputError(f"{shown} is the input {same}: writing it would destroy the data being read; "
                             "give an output path that is not an input")  # fmt: skip
        kind = _not_regular(lst.st_mode)
        if kind is not None:
            raise InputError(f"{shown} is a {kind}; ftflow writes a regular file there (a temporary file renamed "
                             "into place) and replaces nothing else: give the path of a file")  # fmt: skip
        if not lst.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(f"{shown} is read-only; ftflow does not replace a write-protected file: make it "
                             "writable (chmod u+w) or give another path")  # fmt: skip


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _remove_stale(finals: list[Path]) -> list[str]:
    """Remove the temporary files that killed runs of this module left beside `finals`: only
    ours (`.tmp-NAME.ftflow-HOST-PID-…` for these very names), only from this host, only regular
    files, and only once their process is gone; those of converter version 1 (`.tmp-NAME-XXXXXXXX`,
    no pid) once unmodified for a day. Returns the names removed."""
    removed = []
    old_enough = time.time() - _LEGACY_TMP_AGE_S
    for final in finals:
        prefix = f".tmp-{final.name}{_TMP_TAG}{_HOST}-"
        legacy = f".tmp-{final.name}-"  # before the pid was in the name: no owner to ask, so by age
        try:
            entries = list(os.scandir(final.parent))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(prefix):
                m = re.fullmatch(r"(\d+)-[A-Za-z0-9_]+", entry.name[len(prefix) :])
                if m is None or _alive(int(m.group(1))):
                    continue
            elif entry.name.startswith(legacy) and re.fullmatch(r"[a-z0-9_]{8}", entry.name[len(legacy) :]):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime > old_enough:
                        continue
                except OSError:
                    continue
            else:
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(_printable(entry.path))
            except OSError:
                continue
    if removed:
        log.info("removed %d temporary file(s) left by a killed convert: %s", len(removed), ", ".join(removed))
    return removed


def _safe_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


class _Run:
    """Reads inputs, writes samples and rejects, counts everything. One per conversion."""

    def __init__(self, outs: dict[str, _Out], rejects: _Out, *, fmt: str, columns: dict[str, str],
                 system_prompt: str | None, eval_fraction: float, split_seed: int, on_bad_row: str,
                 objective: str):  # fmt: skip
        self.outs, self.rejects = outs, rejects
        self.fmt, self.columns, self.system_prompt = fmt, columns, system_prompt
        self.eval_threshold = int(eval_fraction * 2**64)
        self.seed_key = str(split_seed).encode()
        self.raise_on_bad = on_bad_row == "raise"
        self.sft = objective == "sft"
        self.content, self.ids = _SeenSet(), _SeenSet()
        self.by_reason: dict[str, int] = {}
        self.by_file: dict[str, dict] = {}

    def reject(self, inp: _Input, n: int, raw: Any, row: Any, reason: str, message: str, stats: dict,
               **extra: Any) -> None:  # fmt: skip
        if reason == "duplicate":
            stats["duplicates"] += 1
        else:
            if self.raise_on_bad:
                raise DataError(
                    f"{inp.label} {inp.locator} {n}: {reason}: {message}. Fix the row, or set "
                    "data.on_bad_row: quarantine (--on-bad-row quarantine) to set bad rows aside in a rejects file"
                )
            stats["rejected"] += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if raw is None:
            raw = row
        elif raw.__class__ is str:
            raw = raw.rstrip("\r\n")
        record = {"file": inp.label, inp.locator: n, "reason": reason, "message": message, **extra, "raw": raw}
        try:
            line = _escape_breaks(json.dumps(record, ensure_ascii=False, default=_safe_json)).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: keep it, escaped
            line = json.dumps(record, default=_safe_json).encode("ascii")
        except RecursionError:  # parsed, but too deep to write back (the parser's limit is a little higher)
            record["raw"] = f"(not shown: nested too deeply to write as JSON; see {inp.label} {inp.locator} {n})"
            line = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")
        self.rejects.write([line + b"\n"])

    def convert(self, inp: _Input, split: str | None) -> None:
        """One input into `split` (train/eval), or into both by the id hash when `split` is None."""
        stats = {"split": split or "train+eval", "format": None, "rows_in": 0, "rows_out": 0, "rejected": 0,
                 "duplicates": 0}  # fmt: skip
        self.by_file[inp.label] = stats
        fmt = None if self.fmt == "auto" else self.fmt
        columns, system_prompt, sft = self.columns, self.system_prompt, self.sft
        sha256, blake2b, from_bytes = hashlib.sha256, hashlib.blake2b, int.from_bytes
        seed_key, threshold = self.seed_key, self.eval_threshold
        source = _esc(inp.name + ":")[:-1].encode()  # b'"name:' ; the line number and '"' follow
        system = '{"role": "system", "content": ' + _esc(system_prompt) + "}, " if system_prompt else ""
        alpaca_prefix = "[" + system + '{"role": "user", "content": '
        pending: list[tuple] = []
        rows_in = 0
        features, used = _FEATURE_KEYS, _USED
        for n, raw, row in _rows(inp):
            rows_in += 1
            try:
                if row.__class__ is _Reject:
                    raise row
                if row.__class__ is not dict:
                    if not isinstance(row, dict):
                        raise _Reject("wrong_type", f"the row is a JSON {_kind(row)}, expected an object")
                if columns:
                    row = _rename(row, columns)
                if not features.isdisjoint(row):
                    _unsupported(row)
                found = _detect(row)
                if found is None:
                    raise _Reject(
                        "missing_field",
                        "none of the fields of a known format (messages, conversations, instruction/output, "
                        "instruct/label, text); map your field names with data.columns",
                    )
                if fmt is None:
                    fmt = stats["format"] = found
                    if fmt == "text" and sft:
                        raise DataError(
                            f"{inp.label} holds raw `text` rows ({inp.locator} {n}), which only the pretrain "
                            "objective trains on: set tokenize.objective: pretrain, or give chat data "
                            "(messages, conversations, or instruction/output)"
                        )
                elif found != fmt:
                    message = f"the row looks like {found}, the file is {fmt} (from its first row)"
                    raise _Reject("format_mismatch", message)
                ident = _row_id(row) if "id" in row else None
                if fmt == "alpaca" and (body := _plain_alpaca(row, alpaca_prefix)) is not None:
                    field = b"messages"  # the common row, built directly
                elif fmt == "text":
                    body = _escape_breaks(_esc(_required(row, "text")))
                    if _blank(row["text"]):
                        raise _Reject("empty_content", "`text` is empty (or only invisible characters)")
                    field = b"text"
                else:
                    if fmt == "alpaca":
                        turns = _alpaca(row)
                    else:
                        turns = _turns(row, "messages" if fmt == "messages" else "conversations")
                    if system_prompt and (not turns or turns[0][0] != "system"):
                        turns.insert(0, ("system", system_prompt))
                    _check(turns, sft)
                    body = messages_json(turns)
                    field = b"messages"
                if used[fmt].issuperset(row) and ("instruct" not in row or "instruction" not in row) and (
                    "label" not in row or "output" not in row
                ):  # every field is read (the common row): no meta, decided without a call
                    meta = None
                else:
                    meta = _meta_json(row, fmt)
                try:
                    data = body.encode("utf-8")
                    if meta is not None:
                        meta_bytes = meta.encode("utf-8")
                    id_bytes = ident.encode("utf-8") if ident is not None else None
                except UnicodeEncodeError as e:
                    message = f"a lone surrogate {e.object[e.start]!r} (an unpaired \\ud800-\\udfff escape) is not text"
                    raise _Reject("invalid_utf8", message) from None
            except _Reject as r:
                self.reject(inp, n, raw, row, r.reason, r.message, stats)
                continue
            if meta is None:
                digest = sha256(data).digest()[:8]
            else:  # the carried fields are content too: rows that differ in them are not duplicates
                digest = sha256(data + b"\n" + meta_bytes).digest()[:8]
                data += b', "meta": ' + meta_bytes
            if id_bytes is None:
                id_bytes, id_key = digest.hex().encode(), None
                id_json = b'"%s"' % id_bytes
                ident = None  # made from id_bytes only where a reject needs it
            else:
                id_json = _escape_breaks(_esc(ident)).encode()
                id_key = blake2b(id_bytes, digest_size=8).digest()
            if split:
                to_eval = split == "eval"
            else:
                to_eval = from_bytes(blake2b(id_bytes, digest_size=8, key=seed_key).digest(), "big") < threshold
            line = b'{"id": %s, "%s": %s, "source": %s%d"}\n' % (id_json, field, data, source, n)
            pending.append((digest, id_key, line, to_eval, n, raw, row, ident or id_bytes.decode()))
            if len(pending) >= BATCH:
                self._flush(inp, pending, stats)
                pending = []
        if pending:
            self._flush(inp, pending, stats)
        stats["rows_in"] = rows_in
        stats["format"] = fmt

    def _flush(self, inp: _Input, pending: list[tuple], stats: dict) -> None:
        """Drop duplicates (content first, then input ids) in input order; write the rest."""
        seen = self.content.contains(_keys([p[0] for p in pending]))
        with_id = [i for i, p in enumerate(pending) if p[1] is not None]
        id_seen = dict(zip(with_id, self.ids.contains(_keys([pending[i][1] for i in with_id])))) if with_id else {}
        batch_content: set[bytes] = set()
        batch_ids: set[bytes] = set()
        lines: dict[bool, list[bytes]] = {False: [], True: []}
        for i, (digest, id_key, line, to_eval, n, raw, row, ident) in enumerate(pending):
            if seen[i] or digest in batch_content:
                self.reject(inp, n, raw, row, "duplicate", "same content as an earlier row", stats, id=ident)
            elif id_key is not None and (id_seen[i] or id_key in batch_ids):
                message = f"id {ident!r} is already used by a different sample"
                self.reject(inp, n, raw, row, "duplicate_id", message, stats)
            else:
                batch_content.add(digest)
                if id_key is not None:
                    batch_ids.add(id_key)
                lines[to_eval].append(line)
        self.content.add(_keys(list(batch_content)))
        self.ids.add(_keys(list(batch_ids)))
        for to_eval, chunk in lines.items():
            if chunk:
                self.outs["eval" if to_eval else "train"].write(chunk)
                stats["rows_out"] += len(chunk)


def _validate_options(fmt: str, on_bad_row: str, objective: str, eval_fraction: float, max_reject_fraction: float,
                      columns: dict[str, str], system_prompt: str | None) -> None:  # fmt: skip
    problems = []
    if fmt not in FORMATS:
        problems.append(f"data.format {fmt!r} is not one of {FORMATS}")
    if on_bad_row not in POLICIES:
        problems.append(f"data.on_bad_row {on_bad_row!r} is not one of {POLICIES}")
    if objective not in OBJECTIVES:
        problems.append(f"tokenize.objective {objective!r} is not one of {OBJECTIVES}")
    if not 0.0 <= eval_fraction < 1.0:
        problems.append(f"data.eval_fraction {eval_fraction} must be in [0, 1)")
    if system_prompt is not None and not system_prompt.strip():
        problems.append("data.system_prompt is empty; leave it out (null) for no system prompt")
    if not 0.0 <= max_reject_fraction <= 1.0:
        problems.append(f"data.max_reject_fraction {max_reject_fraction} must be in [0, 1]")
    for src, dst in columns.items():
        if dst not in CANONICAL_FIELDS:
            problems.append(f"data.columns maps {src!r} to {dst!r}, which is not one of {CANONICAL_FIELDS}")
    if problems:
        raise DataError("; ".join(problems))


def _run(groups: list[tuple[list[_Input], str | None]], outs: dict[str, _Out], rejects: _Out, *,
         max_reject_fraction: float, rejects_hint: Path, **options: Any) -> dict:  # fmt: skip
    """Convert every input group; return the report, or raise DataError when the policy fails the run."""
    run = _Run(outs, rejects, **options)
    for inputs, split in groups:
        for inp in inputs:
            run.convert(inp, split)
    files = run.by_file.values()
    rows_in = sum(s["rows_in"] for s in files)
    rejected = sum(s["rejected"] for s in files)
    duplicates = sum(s["duplicates"] for s in files)
    train_rows = outs["train"].rows
    eval_rows = outs["eval"].rows if "eval" in outs else 0
    rows_out = train_rows + eval_rows
    assert rows_in == rows_out + rejected + duplicates, (rows_in, rows_out, rejected, duplicates)
    share = rejected / rows_in if rows_in else 0.0
    report = {
        "status": "ok",
        "rows_in": rows_in,
        "rows_out": rows_out,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "rejected": rejected,
        "duplicates": duplicates,
        "reject_fraction": round(share, 6),
        "by_reason": dict(sorted(run.by_reason.items())),
        "by_file": run.by_file,
        "format_per_file": {label: s["format"] for label, s in run.by_file.items()},
        "converter_version": CONVERTER_VERSION,
    }
    if rows_in == 0:
        raise InputError(f"the inputs hold no rows: {', '.join(run.by_file) or 'no inputs given'}", report)
    if share > max_reject_fraction:
        raise DataError(
            f"{rejected} of {rows_in} rows rejected ({share:.2%}), above data.max_reject_fraction = "
            f"{max_reject_fraction} ({max_reject_fraction:.2%}). Each rejected row and its reason is in {rejects_hint} "
            f"(by reason: {report['by_reason']}). Fix those rows, or raise data.max_reject_fraction "
            "(--max-reject-fraction) if they may be dropped",
            report,
        )
    if rows_out == 0:
        raise DataError(f"no usable rows: all {rows_in} were rejected or duplicates; see {rejects_hint}", report)
    return report


def _summary(report: dict, where: Path) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in report["by_reason"].items()) or "none"
    return (
        f"converted {report['rows_in']:,} rows from {len(report['by_file'])} input(s): {report['train_rows']:,} train, "
        f"{report['eval_rows']:,} eval, {report['rejected']:,} rejected ({reasons}), "
        f"{report['duplicates']:,} duplicates → {where}"
    )


def convert_dataset(
    train_inputs: list[str | Path],
    eval_inputs: list[str | Path],
    out_dir: str | Path,
    *,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    system_prompt: str | None = None,
    eval_fraction: float = 0.1,
    split_seed: int = 0,
    on_bad_row: str = "quarantine",
    max_reject_fraction: float = 0.01,
    objective: str = "sft",
) -> ConvertResult:
    """Convert inputs into out_dir/{train,eval,rejects}.jsonl and out_dir/report.json.

    With no `eval_inputs`, a sample goes to eval when blake2b-64(id, key=str(split_seed)) / 2**64 <
    eval_fraction: a sample's split depends only on its id and the seed, so adding rows never moves
    existing ones. Raises DataError (InputError for unreadable inputs) naming the file, line and fix.
    """
    columns = dict(columns or {})
    _validate_options(fmt, on_bad_row, objective, eval_fraction, max_reject_fraction, columns, system_prompt)
    out = Path(out_dir)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "eval", "rejects")}
    report_path = out / "report.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot make the output folder {_printable(str(out))}: {e.strerror or e}") from None
    train = resolve_inputs(train_inputs)
    evals = resolve_inputs(eval_inputs)
    both = {i.label for i in train} & {i.label for i in evals}
    if both:
        raise InputError(f"{sorted(both)} are in both data.train and data.eval; a file may only be in one")
    _check_outputs({**{f"output {k}": v for k, v in paths.items()}, "report": report_path}, train + evals)
    _remove_stale([*paths.values(), report_path])
    report_path.unlink(missing_ok=True)  # from here on the folder does not look complete
    outs = {"train": _Out(paths["train"]), "eval": _Out(paths["eval"])}
    rejects = _Out(paths["rejects"])
    try:
        report = _run(
            [(evals, "eval"), (train, "train" if evals else None)], outs, rejects,
            max_reject_fraction=max_reject_fraction, rejects_hint=paths["rejects"], fmt=fmt, columns=columns,
            system_prompt=system_prompt, eval_fraction=eval_fraction, split_seed=split_seed,
            on_bad_row=on_bad_row, objective=objective,
        )  # fmt: skip
    except BaseException as e:
        for o in outs.values():
            o.discard()
            o.final.unlink(missing_ok=True)
        if isinstance(e, DataError) and e.report is not None:  # a policy failure: keep the rejects to look at
            rejects.commit()
        else:
            rejects.discard()
        raise
    report["sha256"] = {"train": outs["train"].commit(), "eval": outs["eval"].commit()}
    rejects.commit()
    report["inputs"] = {"train": [_printable(str(p)) for p in train_inputs], "eval": [_printable(str(p)) for p in eval_inputs]}
    report["files"] = {k: _printable(str(v)) for k, v in paths.items()}
    report["options"] = dict(
        fmt=fmt, columns=columns, system_prompt=system_prompt, eval_fraction=eval_fraction, split_seed=split_seed,
        on_bad_row=on_bad_row, max_reject_fraction=max_reject_fraction, objective=objective,
        split="files" if evals else "id_hash",
    )  # fmt: skip
    _Out.write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if report["eval_rows"] == 0 and eval_fraction > 0:
        log.warning("eval split is empty: %d rows at data.eval_fraction %s; give data.eval files or more rows",
                    report["rows_out"], eval_fraction)  # fmt: skip
    log.info(_summary(report, out))
    return ConvertResult(paths["train"], paths["eval"], paths["rejects"], report_path, report)


def convert_cli(
    inputs: list[str],
    out: str,
    fmt: str = "auto",
    report: str | None = None,
    on_bad_row: str = "quarantine",
    max_reject_fraction: float = 0.01,
    system_prompt: str | None = None,
) -> int:
    """`ftflow convert`: every input into ONE canonical file (no split); rejects beside it as
    OUT_STEM.rejects.jsonl. Returns 0 ok, 1 when the data policy fails the run, 2 for unreadable
    inputs. A failed run leaves no OUT (a previous one is removed) but keeps the rejects, and
    writes the report, with "status": "failed", when one is asked for."""
    out_path = Path(out)
    rejects_path = out_path.with_name(out_path.stem + ".rejects.jsonl")
    report_path = Path(report) if report else None
    outputs = {"--out": out_path, "rejects file": rejects_path}
    if report_path:
        outputs["--report"] = report_path
    try:
        _validate_options(fmt, on_bad_row, "sft", 0.0, max_reject_fraction, {}, system_prompt)
        resolved = resolve_inputs(inputs)
        _check_outputs(outputs, resolved)  # before anything is read or written
        for path in outputs.values():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot make the folder of {_printable(str(path))}: {e.strerror or e}") from None
        _remove_stale(list(outputs.values()))
        outs = {"train": _Out(out_path)}
        rejects = _Out(rejects_path)
    except InputError as e:
        log.error("%s", e)
        return 2
    except DataError as e:
        log.error("%s", e)
        return 1
    try:
        result = _run(
            [(resolved, "train")], outs, rejects, max_reject_fraction=max_reject_fraction, rejects_hint=rejects_path,
            fmt=fmt, columns={}, system_prompt=system_prompt, eval_fraction=0.0, split_seed=0,
            on_bad_row=on_bad_row, objective="sft",
        )  # fmt: skip
    except DataError as e:
        outs["train"].discard()
        out_path.unlink(missing_ok=True)  # a failed run leaves no output that looks complete
        if e.report is not None:
            rejects.commit()
            if report_path:
                failed = {**e.report, "status": "failed", "error": str(e)}
                _Out.write_text(report_path, json.dumps(failed, indent=2, ensure_ascii=False) + "\n")
        else:
            rejects.discard()
        log.error("%s", e)
        return 2 if isinstance(e, (InputError, OutputError)) else 1
    except BaseException:
        outs["train"].discard()
        rejects.discard()
        raise
    try:
        result["sha256"] = {"out": outs["train"].commit()}
        rejects.commit()
        result["inputs"] = [_printable(str(p)) for p in inputs]
        result["files"] = {"out": _printable(str(out_path)), "rejects": _printable(str(rejects_path))}
        result["options"] = dict(
            fmt=fmt, on_bad_row=on_bad_row, max_reject_fraction=max_reject_fraction, system_prompt=system_prompt
        )
        if report_path:
            _Out.write_text(report_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    except OutputError as e:
        log.error("%s", e)
        return 2
    log.info(_summary(result, out_path))
    if result["rejected"]:
        log.info("rejected rows and reasons: %s", rejects_path)
    return 0


def convert_from_config(cfg, out_dir: str | Path) -> ConvertResult:
    """`convert_dataset` with the `data` section of a validated PipelineConfig (paths relative to the config)."""
    from ftflow.config import resolve_data_path

    d = cfg.data
    return convert_dataset(
        [resolve_data_path(cfg, p) for p in d.train],
        [resolve_data_path(cfg, p) for p in d.eval],
        out_dir,
        fmt=d.format,
        columns=d.columns,
        system_prompt=d.system_prompt,
        eval_fraction=d.eval_fraction,
        split_seed=d.split_seed,
        on_bad_row=d.on_bad_row,
        max_reject_fraction=d.max_reject_fraction,
        objective=cfg.tokenize.objective,
    )


def convert_key(cfg) -> str | None:
    """The content key of what `convert_from_config` writes: input bytes, data settings, converter code.

    None for an input that is not a local file or folder (a hub dataset can change under the same
    name), which means: not cached. The Prefect task layer caches the data stage on this key."""
    from ftflow.config import resolve_data_path
    from ftflow.utils import sha256_file, sha256_json, sha256_sources, sha256_tree

    digests: list[Any] = []
    for split in (cfg.data.train, cfg.data.eval):
        for inp in resolve_inputs([resolve_data_path(cfg, p) for p in split]):
            if inp.path is None:
                return None
            digests.append([inp.label, sha256_tree(inp.path) if inp.path.is_dir() else sha256_file(inp.path)])
        digests.append("|")
    settings = cfg.data.model_dump(mode="json", exclude={"train", "eval"})
    return sha256_json([digests, settings, cfg.tokenize.objective, sha256_sources(__name__)])
