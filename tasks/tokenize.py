"""Tokenization: canonical JSONL → a cached `datasets` Dataset of input_ids / labels.

One call does the whole stage:

    result = tokenize_dataset("train.jsonl", model_dir, cache_root=state_dir() / "cache" / "tokenized")
    load_from_disk(result.path)  # columns: id, input_ids (int32), labels (int64, -100 = not trained), length

The output folder is named by a content key (JSONL bytes, tokenizer files, template text, every
option that changes tokens, the source of the modules that write them; a hub id is resolved to
its commit and that snapshot's files are hashed), so an unchanged input is a cache hit that does no work,
and a build that dies half-way leaves only a `.tmp-*` folder that is never mistaken for a hit.

Masks come from the rendered text (see `tasks.templates`): the text is cut at the edges of its
trained character spans and each segment is encoded on its own, so the tokens before a reply are
exactly the inference prompt's tokens and no token straddles a prompt/reply edge; a token is
trained when its segment is. (Tokenizers that prepend to every text they encode are encoded whole,
and a token is trained when it overlaps a trained span.) A multi-turn conversation whose earlier
turns the template rewrites (Qwen3), or whose inner edges would change tokens, becomes one sample
per assistant turn (`tokenize.multi_turn`, README "Templates and masks"). The label of position 0
is always -100: nothing precedes it, so it is never a prediction target (with `pretrain` every
other token is trained).

Length policy (`tokenize.length_policy`) for samples longer than `tokenize.max_length` tokens:
- drop (default): the sample goes to the rejects file (reason `too_long`);
- truncate: keep the first max_length tokens, so the prompt stays and the reply is cut. The end
  token is kept only if it fits; none is appended, because a reply cut mid-way must not teach the
  model to stop there. A sample whose cut leaves no trained token is rejected;
- raise: stop at the first long sample, naming it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import logging
import math
import re
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from itertools import chain
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterator

from ftflow.utils import atomic_dir, sha256_file, sha256_json, sha256_sources, state_dir
from tasks.base_model import TOKENIZER_FILES, hub_snapshot, tokenizer_files
from tasks.encode_process import EncodeProcess, EncodeProcessError, find_malloc
from tasks.templates import (BUILTIN_TEMPLATES, NotPrefixStable, Renderer, TemplateError, resolve_template,
                             special_tokens, trained_turns)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MULTI_TURN = ("auto", "split", "reject")  # tokenize.multi_turn
CHUNK_ROWS = 1024  # rows rendered and encoded per batched tokenizer call
ENCODE_PROCESS_MIN_BYTES = 2 << 20  # JSONL size from which the encode runs in a child on a faster malloc
_START, _END = itemgetter(0), itemgetter(1)


class TokenizeError(ValueError):
    """A tokenization problem, phrased for the user (file, line, config key, what to do)."""


@dataclass
class TokenizeResult:
    key: str
    path: Path  # the saved Dataset: `datasets.load_from_disk(path)`
    hit: bool
    stats: dict = field(repr=False)
    rejects_path: Path | None
    template_text: str = field(repr=False)


# --------------------------------------------------------------------------------------------
# cache key


class _TokenizerFiles:
    """Just enough of a tokenizer to resolve `template: auto` from a local folder without loading it."""

    def __init__(self, folder: Path):
        self.name_or_path = str(folder)
        self.chat_template = None
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            self.chat_template = jinja.read_text(encoding="utf-8")
            return
        config = folder / "tokenizer_config.json"
        if config.is_file():
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
                value = {t.get("name"): t.get("template") for t in value}
            self.chat_template = value


def code_identity() -> str:
    """The code that decides the tokens and labels written: this module, the templates, the encoder child."""
    pkg = __name__.rsplit(".", 1)[0]
    return sha256_sources(__name__, f"{pkg}.templates", f"{pkg}.encode_process")[:16]


def tokenizer_folder(tokenizer_path: str, revision: str | None = None) -> Path:
    """The local folder whose files are the tokenizer: the folder itself, or a hub id's snapshot at its commit."""
    folder = Path(tokenizer_path)
    return folder if folder.is_dir() else hub_snapshot(tokenizer_path, revision)[0]


def _tokenizer_fingerprint(tokenizer_path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Hash of the files that define the tokenizer (names and bytes); a hub id's are those of its resolved commit."""
    folder = tokenizer_folder(tokenizer_path, revision)
    files = tokenizer_files(folder, trust_remote_code)
    if not files:
        raise TokenizeError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return sha256_json({str(p.relative_to(folder)): sha256_file(p) for p in files})


def cache_key(
    jsonl_path: str | Path,
    tokenizer_path: str,
    template_text: str,
    objective: str,
    train_on: str,
    max_length: int,
    length_policy: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    multi_turn: str = "auto",
) -> str:
    """Content key of a tokenized data set: changes whenever any input that changes its tokens does."""
    parts = {
        "jsonl": sha256_file(jsonl_path),
        "tokenizer": _tokenizer_fingerprint(tokenizer_path, revision, trust_remote_code),
        "template": sha256_json(template_text),
        "objective": objective,
        # train_on changes nothing under pretrain; keep it in the key anyway: simple beats clever here.
        "train_on": train_on,
        "max_length": int(max_length),
        "length_policy": length_policy,
        "multi_turn": multi_turn,
        "code": code_identity(),
    }
    return sha256_json(parts)[:32]


# --------------------------------------------------------------------------------------------
# loading


def load_tokenizer(tokenizer_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path, revision=revision, trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise TokenizeError(
            f"the tokenizer of {tokenizer_path} has no fast (Rust `tokenizers`) backend; ftflow maps trained "
            "characters to tokens through its offsets. Use a model that ships a tokenizer.json."
        )
    return tok


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) for every non-blank line; a broken line yields its exception.

    orjson parses (1.5x json here); any line it refuses goes to `json`, whose result or error is
    the one kept: it also accepts what orjson does not (lone surrogates, NaN, huge integers).
    """
    try:
        from orjson import JSONDecodeError as FastError, loads as fast_loads
    except ImportError:  # pragma: no cover - orjson comes with prefect
        FastError, fast_loads = json.JSONDecodeError, json.loads
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, fast_loads(line)
            except FastError:
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, err


# --------------------------------------------------------------------------------------------
# building


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _prepends_to_each_text(backend) -> bool:
    """Whether the tokenizer adds something to the start of every text it encodes.

    A Metaspace pre-tokenizer with a prepend scheme (SentencePiece-style Llama-2, Mistral), a
    `Prepend` normalizer (legacy Llama) or ByteLevel's `add_prefix_space` write a "▁"/space before
    each text: encoding a reply on its own would then give it a different first token than the
    same text in context. Such tokenizers are encoded whole (offsets locate the trained spans).
    """
    def state(component) -> Any:  # the component's own JSON (not the whole tokenizer's: 151k vocab = 2 s)
        return json.loads(component.__getstate__()) if component is not None else None

    def nodes(node: Any, children: str) -> Iterator[dict]:
        if isinstance(node, dict):
            yield node
            for child in node.get(children) or []:
                yield from nodes(child, children)

    if any(n.get("type") == "Prepend" for n in nodes(state(backend.normalizer), "normalizers")):
        return True
    for n in nodes(state(backend.pre_tokenizer), "pretokenizers"):
        if n.get("type") == "Metaspace":
            scheme = n.get("prepend_scheme") or ("always" if n.get("add_prefix_space", True) else "never")
            if scheme != "never":
                return True
        if n.get("type") == "ByteLevel" and n.get("add_prefix_space"):
            return True
    return False


@dataclass
class _Chunk:
    """Samples on their way through the builder: rendered (prepare), then encoded (encode).

    Segment-wise (the default): `texts` holds every sample's segments in order, `trained` one flag
    per segment, `segments` how many segments each sample has. Whole-text (tokenizers that prepend
    to every text): `texts` holds one text per sample and `spans` its trained character spans.
    """

    texts: list[str] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    metas: list[tuple[str, int]] = field(default_factory=list)  # (sample id, line)
    flat: Any = None  # the chunk's token ids, one flat int64 array (encode)
    counts: Any = None  # tokens per text (int64)
    offsets: list[list[tuple[int, int]]] | None = None  # whole-text mode only


def segments_of(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """The rendered text cut at the trained spans' edges: [(segment, trained), ...], no empty segment."""
    out, pos = [], 0
    for a, b in spans:
        a = max(a, pos)
        if a > pos:
            out.append((text[pos:a], False))
        if b > a:
            out.append((text[a:b], True))
            pos = b
    if pos < len(text):
        out.append((text[pos:], False))
    return out


class _Builder:
    """Turns rows into (input_ids, labels) columns, chunk by chunk, counting what it drops and why.

    Per row, Python only validates and renders (text + trained character spans, cut into
    segments). The segments of a chunk are encoded in one batched call and everything after that
    (labels, truncation, trained counts, the Arrow columns) is done on flat numpy arrays, one
    chunk at a time.
    """

    def __init__(self, tokenizer, template_text: str, objective: str, train_on: str, max_length: int,
                 length_policy: str, source: Path, multi_turn: str = "auto"):
        self.renderer = Renderer(tokenizer, template_text)
        self.backend = tokenizer.backend_tokenizer
        self.segmentwise = not _prepends_to_each_text(self.backend)
        self.encoder: EncodeProcess | None = None  # set by _build for large inputs
        self.encoder_name = "in process"
        self.eos = tokenizer.eos_token or ""
        specials = sorted(special_tokens(tokenizer), key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        # Added tokens cut the text before the tokenizer's model sees it: a segment edge at one of
        # them changes no token. (Not those that swallow the whitespace beside them.)
        added = [t for t in self.backend.get_added_tokens_decoder().values()
                 if t.content and not (t.lstrip or t.rstrip)]
        self.cut_tokens = tuple(sorted({t.content for t in added}, key=len, reverse=True))
        self.added_re = re.compile("|".join(map(re.escape, self.cut_tokens))) if self.cut_tokens else None
        self.objective, self.train_on, self.multi_turn = objective, train_on, multi_turn
        self.max_length, self.length_policy, self.source = max_length, length_policy, source
        self.tables: list = []  # one Arrow table (id, input_ids, labels, length) per chunk
        self.lengths: list[int] = []  # every kept sample's length, for the stats
        self.raw_lengths: list[int] = []
        self.rejects: list[dict] = []
        self.reasons: Counter = Counter()
        self.split_because: Counter = Counter()  # conversations split into per-turn samples, by cause
        self.rows = self.truncated = self.dropped = self.trained = self.split_samples = 0

    def _prepare(self, row: Any) -> tuple[list[tuple[str, Any]], bool]:
        """One row's samples as [(id suffix, (text, spans) or a _Reject)], and whether its segment
        edges must be checked against the tokenizer (a whole multi-turn conversation); a _Reject
        raised here rejects the whole row."""
        if isinstance(row, json.JSONDecodeError):
            raise _Reject("bad_json", str(row))
        if not isinstance(row, dict):
            raise _Reject("bad_row", "a row must be a JSON object")
        messages = row.get("messages")
        if messages is None:
            text = row.get("text")
            if not isinstance(text, str):
                raise _Reject("bad_row", "a row needs `messages` (a list) or `text` (a string)")
            if self.objective != "pretrain":
                raise _Reject("no_assistant_turn", "a raw text row has nothing to train under `tokenize.objective: sft`; "
                              "use objective: pretrain")
            text += self.eos
            return [("", (text, [(0, len(text))]))], False
        if not isinstance(messages, list) or not messages:
            raise _Reject("bad_row", "`messages` must be a non-empty list")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _Reject("bad_row", "every message needs a string `role` and a string `content`")
            if self.special_re is not None and self.special_re.search(m["content"]):
                # Written into the text, it would become the real control token (prompt injection / broken masks).
                tok = self.special_re.search(m["content"]).group(0)
                raise _Reject("special_token_in_content", f"a {m['role']} message contains the special token {tok!r}")
        if self.objective == "sft" and not any(m["role"] == "assistant" for m in messages):
            raise _Reject("no_assistant_turn", "no assistant message to train")
        try:
            if self.objective == "pretrain":
                return [("", self.renderer.spans(messages, "pretrain", self.train_on))], False
            if self.multi_turn != "split" or len(trained_turns(messages, self.train_on)) < 2:
                try:
                    text, spans = self.renderer.spans(messages, "sft", self.train_on)
                    return [("", (text, spans))], len(spans) > 1
                except NotPrefixStable as err:
                    if self.multi_turn == "reject":
                        raise _Reject("not_prefix_stable", f"{err}. Set tokenize.multi_turn: auto to train each "
                                      "assistant turn in its own sample with the context inference gives it") from None
            return self._split(messages, "template" if self.multi_turn != "split" else "multi_turn_split"), False
        except (_Reject, TemplateError):
            raise  # TemplateError: the template itself is unusable: stop, don't reject every row
        except Exception as err:  # jinja raise_exception / TypeError on odd rows
            raise _Reject("template_error", f"{type(err).__name__}: {err}") from None

    def _split(self, messages: list[dict], cause: str) -> list[tuple[str, Any]]:
        """One sample per trained assistant turn (messages[:i + 1], its last turn trained); ids get
        `#k` (k = 1, 2, ... the trained turns in order) when there is more than one."""
        turns = trained_turns(messages, self.train_on)
        out = []
        for k, i in enumerate(turns, 1):
            try:
                sample: Any = self.renderer.turn_sample(messages, i)
            except NotPrefixStable as err:
                sample = _Reject("not_prefix_stable", f"assistant turn {k} (messages[{i}]): {err}")
            out.append((f"#{k}" if len(turns) > 1 else "", sample))
        if len(turns) > 1:
            self.split_because[cause] += 1
            self.split_samples += len(turns)
        return out

    def _edges_to_check(self, text: str, spans: list[tuple[int, int]]) -> list[tuple[str, str]]:
        """The (left, right) text pieces around each segment edge inside a later turn's prompt.

        Turn i's prompt, encoded segment by segment, equals the generation prompt encoded whole
        when no edge inside it changes tokens. An edge at an added token (`<|im_end|>`) cannot:
        the tokenizer cuts there anyway. Any other edge (the start of an earlier reply, after
        "assistant\n") is checked by encoding the piece between the added tokens around it whole
        and in two.
        """
        inner = sorted({p for a, b in spans[:-1] for p in (a, b) if 0 < p < len(text)})
        cuts = [m.span() for m in self.added_re.finditer(text)] if self.added_re is not None else []
        out = []
        for p in inner:
            if any(text.startswith(t, p) or text.endswith(t, 0, p) for t in self.cut_tokens):
                continue
            left = max((e for s, e in cuts if e <= p), default=0)
            right = min((s for s, e in cuts if s >= p), default=len(text))
            out.append((text[left:p], text[p:right]))
        return out

    def _reject(self, sid: str, line: int, reason: str, detail: str = "", length: int | None = None) -> None:
        self.reasons[reason] += 1
        if reason == "too_long":
            self.dropped += 1
        self.rejects.append({"id": sid, "line": line, "reason": reason, "detail": detail, "length": length})

    def encode(self, chunk: _Chunk) -> None:
        """The tokenizer's part of a chunk: one batched call, in the child process on a faster malloc
        when there is one (`tasks.encode_process`), else here (the GIL is released while it runs)."""
        import numpy as np

        if self.encoder is not None:
            try:
                flat, counts, chunk.offsets = self.encoder.encode(chunk.texts)
                chunk.flat = np.frombuffer(flat, dtype=np.int32).astype(np.int64)
                chunk.counts = np.frombuffer(counts, dtype=np.int64)
                return
            except EncodeProcessError as err:
                log.warning("%s; encoding the rest in this process (same tokens, slower)", err)
                self.encoder, self.encoder_name = None, "in process (the tokenizer process failed)"
        encodings = (self.backend.encode_batch_fast if self.segmentwise else self.backend.encode_batch)(
            chunk.texts, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        chunk.counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        chunk.flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(chunk.counts.sum()))
        chunk.offsets = None if self.segmentwise else [e.offsets for e in encodings]

    def _token_spans(self, chunk: _Chunk):
        """A chunk's flat token ids, each sample's first token (n + 1 entries) and the trained mask.

        Segment-wise, a sample's tokens are its segments' tokens in order and a token is trained
        when its segment is. Whole-text, a token is trained when it overlaps a trained character
        span: from the first token ending after the span's start to the last starting before its end.
        """
        import numpy as np

        flat, counts = chunk.flat, chunk.counts
        if self.segmentwise:
            seg_starts = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=seg_starts[1:])
            first_seg = np.zeros(len(chunk.segments) + 1, dtype=np.int64)
            np.cumsum(chunk.segments, out=first_seg[1:])
            trained = np.repeat(np.array(chunk.trained, dtype=bool), counts)
            return flat, seg_starts[first_seg], trained
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        ranges: list[tuple[int, int]] = []  # global token indices into `flat`
        for r, (offsets, row_spans) in enumerate(zip(chunk.offsets, chunk.spans)):
            ranges += self._ranges_from_offsets(offsets, row_spans, int(starts[r]))
        # Trained mask from the [a, b) ranges: +1 at a, -1 at b, running sum > 0.
        total = len(flat)
        marks = np.zeros(total + 1, dtype=np.int64)
        if ranges:
            a, b = np.array(ranges, dtype=np.int64).T
            keep = b > a
            marks += np.bincount(a[keep], minlength=total + 1) - np.bincount(b[keep], minlength=total + 1)
        return flat, starts, np.cumsum(marks[:total]) > 0

    @staticmethod
    def _ranges_from_offsets(offsets, row_spans, first: int) -> list[tuple[int, int]]:
        out, prev = [], 0
        for cs, ce in row_spans:
            a = max(bisect_right(offsets, cs, key=_END), prev)  # first token ending after cs
            b = bisect_left(offsets, ce, key=_START)  # first token starting at/after ce
            if b > a:
                out.append((first + a, first + b))
                prev = b
        return out

    def add(self, rows: list[tuple[int, Any]]) -> None:
        """Prepare, encode and finish one chunk of (line, row) pairs."""
        chunk = self.prepare(rows)
        if chunk is not None:
            self.encode(chunk)
            self.finish(chunk)

    def prepare(self, rows: list[tuple[int, Any]]) -> _Chunk | None:
        """Validate, render and cut a chunk into segments (Python); rejects are recorded here.

        Whole multi-turn conversations have their inner segment edges checked in one batched
        encode of the pieces around them; one whose edges change tokens is split into one sample
        per turn (`tokenize.multi_turn: auto`) or rejected (`reject`).
        """
        rendered = []  # (sid, line, samples, edges)
        checks: list[str] = []
        for line, row in rows:
            self.rows += 1
            sid = str(row.get("id")) if isinstance(row, dict) and row.get("id") is not None else f"line-{line}"
            try:
                samples, check = self._prepare(row)
            except _Reject as r:
                self._reject(sid, line, r.reason, r.detail)
                continue
            edges = []
            if check and self.segmentwise:
                text, spans = samples[0][1]
                edges = self._edges_to_check(text, spans)
                for left, right in edges:
                    checks += (left + right, left, right)
            rendered.append((sid, line, row, samples, len(edges)))
        stable = iter(self._edges_keep_tokens(checks))

        chunk = _Chunk()
        for sid, line, row, samples, n_edges in rendered:
            if n_edges and not all([next(stable) for _ in range(n_edges)]):
                if self.multi_turn == "reject":
                    self._reject(sid, line, "not_prefix_stable", "an earlier reply's first characters merge into one "
                                 "token with the text before them, so a later turn's context would not be the tokens "
                                 "inference sends. Set tokenize.multi_turn: auto to train each assistant turn in "
                                 "its own sample")
                    continue
                samples = self._split(row["messages"], "token_boundary")
            for suffix, sample in samples:
                if isinstance(sample, _Reject):
                    self._reject(sid + suffix, line, sample.reason, sample.detail)
                    continue
                text, spans = sample
                try:
                    text.encode("utf-8")  # lone surrogates (e.g. "\ud800" in the JSON) cannot be tokenized
                except UnicodeEncodeError:
                    self._reject(sid + suffix, line, "invalid_unicode", "text holds a lone surrogate code point")
                    continue
                if self.segmentwise:
                    segments = segments_of(text, spans)
                    chunk.texts += [t for t, _ in segments]
                    chunk.trained += [trained for _, trained in segments]
                    chunk.segments.append(len(segments))
                else:
                    chunk.texts.append(text)
                    chunk.spans.append(spans)
                chunk.metas.append((sid + suffix, line))
        return chunk if chunk.metas else None

    def _edges_keep_tokens(self, checks: list[str]) -> list[bool]:
        """For each (whole, left, right) triple: encode(whole) == encode(left) + encode(right)."""
        if not checks:
            return []
        ids = [e.ids for e in self.backend.encode_batch_fast(checks, add_special_tokens=False)]
        return [ids[k] == ids[k + 1] + ids[k + 2] for k in range(0, len(ids), 3)]

    def finish(self, chunk: _Chunk) -> None:
        """Labels, length policy and the chunk's Arrow table, on flat numpy arrays."""
        import numpy as np
        import pyarrow as pa

        metas = chunk.metas
        flat, starts, trained = self._token_spans(chunk)
        total = len(flat)
        counts = np.diff(starts)
        trained[starts[:-1][counts > 0]] = False  # position 0 is never a target

        # Length policy per row (Python: one comparison per row), then the kept tokens in one go.
        n_keep = np.minimum(counts, self.max_length)
        row_kept = np.ones(len(metas), dtype=bool)
        trained_cum = np.concatenate(([0], np.cumsum(trained)))
        row_trained = (trained_cum[starts[:-1] + n_keep] - trained_cum[starts[:-1]]).tolist()  # after truncation
        raw = counts.tolist()
        self.raw_lengths += raw
        for r, ((sid, line), n) in enumerate(zip(metas, raw)):
            truncated = False
            if n > self.max_length:
                if self.length_policy == "raise":
                    raise TokenizeError(
                        f"sample {sid!r} ({self.source}, line {line}) has {n} tokens > tokenize.max_length="
                        f"{self.max_length}. Raise tokenize.max_length, or set tokenize.length_policy to "
                        "truncate or drop."
                    )
                if self.length_policy == "drop":
                    self._reject(sid, line, "too_long", f"{n} tokens > max_length {self.max_length}", n)
                    row_kept[r] = False
                    continue
                n, truncated = self.max_length, True
            n_trained = row_trained[r]
            if n_trained == 0:
                reason = "no_trained_tokens_after_truncation" if truncated else "no_trained_tokens"
                detail = "the prompt fills tokenize.max_length" if truncated else "no token falls in a trained span"
                self._reject(sid, line, reason, detail, n)
                row_kept[r] = False
                continue
            self.truncated += truncated
            self.trained += n_trained
            self.lengths.append(n)
        if not row_kept.any():
            return
        row_of = np.repeat(np.arange(len(metas)), counts)
        position = np.arange(total) - starts[:-1][row_of]
        take = row_kept[row_of] & (position < n_keep[row_of])
        lengths = n_keep[row_kept]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = flat[take]
        labels = np.where(trained[take], ids, IGNORE_INDEX)
        self.tables.append(pa.table({
            "id": pa.array([m[0] for m, k in zip(metas, row_kept.tolist()) if k], type=pa.string()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32))),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels.astype(np.int64))),
            "length": pa.array(lengths.astype(np.int32)),
        }))

    def samples(self) -> list[dict]:
        """The kept samples so far as Python dicts (for tests and small inspections)."""
        return [row for table in self.tables for row in table.to_pylist()]

    def stats(self) -> dict:
        lengths = sorted(self.lengths)
        edges = sorted({round(self.max_length * i / 8) for i in range(9)})
        counts = [0] * (len(edges) - 1)
        for n in lengths:
            counts[min(max(bisect_left(edges, n) - 1, 0), len(counts) - 1)] += 1
        raw = sorted(self.raw_lengths)
        return {
            "rows_read": self.rows,
            "samples": len(lengths),
            "tokens": sum(lengths),
            "trained_tokens": self.trained,
            "truncated": self.truncated,
            "dropped": self.dropped,
            # Conversations trained as one sample per assistant turn (tokenize.multi_turn), the
            # samples they became, and why: the template rewrites earlier turns ("template"), an
            # earlier reply's first characters merge with the prompt's last ("token_boundary"), or
            # `multi_turn: split` ("multi_turn_split").
            "split_conversations": sum(self.split_because.values()),
            "split_samples": self.split_samples,
            "split_because": dict(sorted(self.split_because.items())),
            "rejected": dict(sorted(self.reasons.items())),
            "rejected_total": sum(self.reasons.values()),
            "length": _summary(lengths),
            "length_before_policy": _summary(raw),
            "length_histogram": {"edges": edges, "counts": counts},
        }


def _summary(sorted_values: list[int]) -> dict:
    if not sorted_values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    pick = lambda q: sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]  # noqa: E731
    return {
        "min": sorted_values[0],
        "mean": round(sum(sorted_values) / len(sorted_values), 2),
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": sorted_values[-1],
    }


def _save_dataset(builder: _Builder, out: Path, fingerprint: str) -> None:
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    table = pa.concat_tables(builder.tables)
    from datasets import utils as ds_utils

    quiet = not ds_utils.are_progress_bars_disabled()
    if quiet:  # our own log line reports the save; a bar per shard is noise
        ds_utils.disable_progress_bars()
    try:
        # An explicit fingerprint: otherwise datasets hashes the whole table just to name it.
        Dataset(InMemoryTable(table), fingerprint=fingerprint).save_to_disk(str(out))
    finally:
        if quiet:
            ds_utils.enable_progress_bars()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building.

    The build allocates millions of small lists (no cycles: refcounting frees them), and in a
    process that imported torch/transformers every full collection walks a huge heap; with the
    collector on, a third of the build went to collections.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _chunks(items: Iterator[tuple[int, Any]], size: int) -> Iterator[list[tuple[int, Any]]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _build(builder: _Builder, items: Iterator[tuple[int, Any]], t0: float, malloc: str | None = None) -> None:
    """Feed every row through the builder, the tokenizer overlapping Python's work.

    While the Rust tokenizer encodes chunk k on a background thread (it releases the GIL), or in
    the child process that runs it on `malloc` (`tasks.encode_process`), this thread finishes
    chunk k-1 and reads and renders chunk k+1: on two cores a third faster than doing the steps one
    after another, and the same rows, in the same order, either way.
    """
    encoder = None
    if malloc is not None:
        try:
            encoder = builder.encoder = EncodeProcess(builder.backend, with_offsets=not builder.segmentwise,
                                                      malloc=malloc)
        except EncodeProcessError as err:
            log.warning("%s; encoding in this process (same tokens, slower)", err)
    try:
        _feed(builder, items, t0)
    finally:
        if encoder is not None:
            if builder.encoder is not None:  # else it failed and the builder says so
                builder.encoder_name = encoder.describe()
            builder.encoder = None
            encoder.close()


def _feed(builder: _Builder, items: Iterator[tuple[int, Any]], t0: float) -> None:
    from concurrent.futures import ThreadPoolExecutor

    last_log = time.perf_counter()
    with ThreadPoolExecutor(2, thread_name_prefix="ftflow-encode") as pool:
        pending = None  # (chunk, future of its encode)
        for rows in _chunks(items, CHUNK_ROWS):
            chunk = builder.prepare(rows)
            # Submit this chunk before finishing the previous one, so the tokenizer never waits.
            current = (chunk, pool.submit(builder.encode, chunk)) if chunk is not None else None
            if pending is not None:
                pending[1].result()
                builder.finish(pending[0])
            pending = current
            if time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log.info("tokenized %d rows (%.0f rows/s)", builder.rows, builder.rows / (last_log - t0))
        if pending is not None:
            pending[1].result()
            builder.finish(pending[0])


def _tokenizer_malloc() -> str | None:
    try:
        return find_malloc()
    except FileNotFoundError as err:
        raise TokenizeError(str(err)) from None


def _is_complete(folder: Path) -> bool:
    return (folder / "stats.json").is_file() and (folder / "dataset" / "state.json").is_file()


def _key_and_template(jsonl_path, tokenizer_path: str, *, template: str, objective: str, train_on: str, max_length: int,
                      length_policy: str, revision: str | None, trust_remote_code: bool, multi_turn: str):
    """(cache key, template text, the tokenizer if it had to be loaded to find the template, else None).

    A hub id is read from its snapshot folder at the resolved commit (`tokenizer_folder`): the files
    hashed into the key are the files the tokens are made from."""
    folder = tokenizer_folder(tokenizer_path, revision)
    tokenizer = None
    if folder == Path(tokenizer_path) or (folder / "chat_template.jinja").is_file():
        template_text = resolve_template(template, _TokenizerFiles(folder))  # cheap: no tokenizer load before a miss
    else:  # a hub tokenizer may keep its template where only transformers looks (chat_template.json, ...)
        tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
        template_text = resolve_template(template, tokenizer)
    key = cache_key(jsonl_path, tokenizer_path, template_text, objective, train_on, max_length, length_policy,
                    revision=revision, trust_remote_code=trust_remote_code, multi_turn=multi_turn)
    return key, template_text, tokenizer


def tokenize_key(cfg, jsonl_path: str | Path, model_path: str) -> str:
    """The content key of the tokenized set `tokenize_from_config` makes: its cache folder's name.

    The one key of this artifact: the Prefect task layer caches on it too (`tasks.stages.tokenize`)."""
    return _key_and_template(Path(jsonl_path), model_path, **_options(cfg))[0]


def tokenize_dataset(
    jsonl_path: str | Path,
    tokenizer_path: str,
    *,
    cache_root: Path,
    template: str = "auto",
    objective: str = "sft",
    train_on: str = "all_assistant",
    max_length: int = 512,
    length_policy: str = "drop",
    trust_remote_code: bool = False,
    revision: str | None = None,
    multi_turn: str = "auto",
) -> TokenizeResult:
    """Tokenize a canonical JSONL file, or return the cached result of the same inputs."""
    if objective not in ("sft", "pretrain"):
        raise TokenizeError(f"tokenize.objective={objective!r}: choose sft or pretrain")
    if train_on not in ("all_assistant", "last_assistant"):
        raise TokenizeError(f"tokenize.train_on={train_on!r}: choose all_assistant or last_assistant")
    if length_policy not in ("drop", "truncate", "raise"):
        raise TokenizeError(f"tokenize.length_policy={length_policy!r}: choose drop, truncate or raise")
    if multi_turn not in MULTI_TURN:
        raise TokenizeError(f"tokenize.multi_turn={multi_turn!r}: choose {', '.join(MULTI_TURN)}")
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise TokenizeError(f"{jsonl_path} does not exist; it is the data stage's output (canonical JSONL), run that first")
    cache_root = Path(cache_root)

    key, template_text, tokenizer = _key_and_template(
        jsonl_path, tokenizer_path, template=template, objective=objective, train_on=train_on, max_length=max_length,
        length_policy=length_policy, revision=revision, trust_remote_code=trust_remote_code, multi_turn=multi_turn)
    final = cache_root / key
    read = {"jsonl": str(jsonl_path), "tokenizer": str(tokenizer_path), "key": key}

    if _is_complete(final):
        stats = {**json.loads((final / "stats.json").read_text(encoding="utf-8")), **read}
        rejects = final / "rejects.jsonl"
        log.info("tokenized data cache hit %s (%d samples)", final, stats.get("samples", 0))
        return TokenizeResult(key, final / "dataset", True, stats, rejects if rejects.exists() else None,
                              (final / "template.jinja").read_text(encoding="utf-8"))
    if final.exists():  # not complete (written by hand or an old version): never used, rebuilt
        shutil.rmtree(final)

    t0 = time.perf_counter()
    if tokenizer is None:
        tokenizer = load_tokenizer(str(tokenizer_folder(tokenizer_path, revision)), trust_remote_code=trust_remote_code)
    if template in BUILTIN_TEMPLATES:  # checks the special tokens a built-in writes against the real tokenizer
        resolve_template(template, tokenizer)
    builder = _Builder(tokenizer, template_text, objective, train_on, max_length, length_policy, jsonl_path, multi_turn)
    log.info("tokenizing %s (template %s, objective %s, max_length %d) into %s",
             jsonl_path, template, objective, max_length, final)
    # Small inputs encode in this process: the child gains nothing below ~2 MB (2,000 bench rows, 1.9 MB: even).
    malloc = _tokenizer_malloc() if jsonl_path.stat().st_size >= ENCODE_PROCESS_MIN_BYTES else None
    with _gc_paused():
        _build(builder, _read_jsonl(jsonl_path), t0, malloc)

    stats = {
        **read,
        "template": template,
        "objective": objective,
        "train_on": train_on,
        "max_length": max_length,
        "length_policy": length_policy,
        "multi_turn": multi_turn,
        "code": code_identity(),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **builder.stats(),
        "encoder": builder.encoder_name,
    }
    if stats["samples"] == 0:
        examples = "; ".join(f"line {r['line']}: {r['reason']} {r['detail']}" for r in builder.rejects[:3])
        raise TokenizeError(
            f"no sample of {jsonl_path} survived tokenization (rejected: {stats['rejected']}). "
            f"First rejects: {examples}. Check tokenize.template / tokenize.objective / tokenize.max_length."
        )
    with atomic_dir(final) as tmp:
        _save_dataset(builder, tmp / "dataset", key)
        if builder.rejects:
            with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as f:
                for r in builder.rejects:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "template.jinja").write_text(template_text, encoding="utf-8")
        stats["build_seconds"] = round(time.perf_counter() - t0, 3)
        # stats.json last: together with the rename it marks the folder complete.
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("tokenized %d rows → %d samples, %d tokens (%d trained), %d dropped, %d rejected in %.1fs",
             stats["rows_read"], stats["samples"], stats["tokens"], stats["trained_tokens"], stats["dropped"],
             stats["rejected_total"], stats["build_seconds"])
    rejects = final / "rejects.jsonl"
    return TokenizeResult(key, final / "dataset", False, stats, rejects if rejects.exists() else None, template_text)


# --------------------------------------------------------------------------------------------
# CLI (`ftflow tokenize`, `ftflow show-sample`)


def tokenize_from_config(cfg, jsonl_path: str | Path, model_path: str) -> TokenizeResult:
    """`tokenize_dataset` with the `tokenize` and `model` sections of a validated PipelineConfig."""
    return tokenize_dataset(jsonl_path, model_path, cache_root=state_dir() / "cache" / "tokenized", **_options(cfg))


def _options(cfg) -> dict[str, Any]:
    """The `tokenize_dataset` options of a validated PipelineConfig (the key and the build read the same ones)."""
    t = cfg.tokenize
    return dict(
        template=t.template,
        objective=t.objective,
        train_on=t.train_on,
        max_length=t.max_length,
        length_policy=t.length_policy,
        multi_turn=t.multi_turn,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )


def _tokenize_from_config(config_path: str, overrides: list[str]):
    from ftflow.config import load_config
    from tasks.base_model import resolve_model_path
    from tasks.convert import convert_from_config

    cfg = load_config(config_path, overrides)
    converted = convert_from_config(cfg, state_dir() / "data" / cfg.name)
    model_path = resolve_model_path(cfg.model.name_or_path)
    return cfg, model_path, tokenize_from_config(cfg, converted.train_path, model_path)


def _user_errors() -> tuple[type[Exception], ...]:
    from ftflow.config import ConfigError

    return (ConfigError, TokenizeError, TemplateError, FileNotFoundError)


def tokenize_cli(config_path: str, overrides: list[str], as_json: bool) -> int:
    """`ftflow tokenize CONFIG [--set K=V ...] [--json]`: build (or find) the tokenized train set."""
    try:
        # Libraries print to stdout (DeepSpeed's accelerator notice, imported when the embedded model
        # is first built): keep stdout for the report, so `--json` output always parses.
        with contextlib.redirect_stdout(sys.stderr):
            _, _, r = _tokenize_from_config(config_path, overrides)
    except _user_errors() as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if as_json:
        out = {"key": r.key, "path": str(r.path), "hit": r.hit,
               "rejects": str(r.rejects_path) if r.rejects_path else None, "stats": r.stats}
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        return 0
    s = r.stats
    lines = [
        f"key      {r.key} ({'hit' if r.hit else 'miss: built'})",
        f"dataset  {r.path}",
        f"samples  {s['samples']} of {s['rows_read']} rows; {s['tokens']} tokens, {s['trained_tokens']} trained",
        f"length   {s['length']}",
        f"policy   {s['length_policy']} at {s['max_length']}: {s['truncated']} truncated, {s['dropped']} dropped",
        f"rejected {s['rejected_total']} {s['rejected'] or ''}" + (f" → {r.rejects_path}" if r.rejects_path else ""),
    ]
    if s.get("split_conversations"):
        lines.append(f"split    {s['split_conversations']} conversations into {s['split_samples']} samples, one per "
                     f"assistant turn {s['split_because']} (tokenize.multi_turn: {s['multi_turn']})")
    if not r.hit:
        lines.append(f"built    in {s['build_seconds']} s, encode: {s['encoder']}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def format_sample(tokenizer, input_ids: list[int], labels: list[int], open_mark: str = "⟦", close_mark: str = "⟧") -> str:
    """Decoded sample with each run of trained tokens wrapped in ⟦…⟧."""
    parts, run, run_trained = [], [], None
    for tid, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if run and trained != run_trained:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parts.append(open_mark + text + close_mark if run_trained else text)
            run = []
        run.append(tid)
        run_trained = trained
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts.append(open_mark + text + close_mark if run_trained else text)
    return "".join(parts)


def show_sample_cli(config_path: str, overrides: list[str], index: int) -> int:
    """`ftflow show-sample CONFIG --index N`: one tokenized sample, trained spans marked ⟦…⟧."""
    try:
        cfg, model_path, r = _tokenize_from_config(config_path, overrides)
    except _user_errors() as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    from datasets import load_from_disk

    ds = load_from_disk(str(r.path))
    if not -len(ds) <= index < len(ds):
        sys.stderr.write(f"error: --index {index} is out of range; the tokenized set has {len(ds)} samples\n")
        return 2
    row = ds[index]
    tok = load_tokenizer(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    trained = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
    sys.stdout.write(
        f"sample {index} id={row['id']}: {row['length']} tokens, {trained} trained (inside ⟦…⟧)\n"
        f"{format_sample(tok, row['input_ids'], row['labels'])}\n"
    )
    return 0

