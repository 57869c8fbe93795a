"""Tokenization: canonical JSONL → a cached `datasets` Dataset of input_ids / labels.

One call does the whole stage:

    result = tokenize_dataset("train.jsonl", model_dir, cache_root=state_dir() / "cache" / "tokenized")
    load_from_disk(result.path)  # columns: id, input_ids (int32), labels (int64, -100 = not trained), length

The output folder is named by a content key (JSONL bytes, tokenizer files, template text, every
option that changes tokens, code version), so an unchanged input is a cache hit that does no work,
and a build that dies half-way leaves only a `.tmp-*` folder that is never mistaken for a hit.

Masks come from the rendered text (see `tasks.templates`): each trained character span is mapped
to the tokens that overlap it through the fast tokenizer's offsets. The label of position 0 is
always -100: nothing precedes it, so it is never a prediction target (with `pretrain` every other
token is trained).

Length policy (`tokenize.length_policy`) for samples longer than `tokenize.max_length` tokens:
- drop (default): the sample goes to the rejects file (reason `too_long`);
- truncate: keep the first max_length tokens, so the prompt stays and the reply is cut. The end
  token is kept only if it fits; none is appended, because a reply cut mid-way must not teach the
  model to stop there. A sample whose cut leaves no trained token is rejected;
- raise: stop at the first long sample, naming it.
"""

from __future__ import annotations

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterator

from ftflow.utils import atomic_dir, sha256_file, sha256_json, state_dir
from tasks.templates import BUILTIN_TEMPLATES, Renderer, TemplateError, special_tokens, resolve_template

log = logging.getLogger(__name__)

TOKENIZE_CODE_VERSION = "1"  # bump when the tokens or labels this module writes change
IGNORE_INDEX = -100
CHUNK_ROWS = 2048  # rows rendered and encoded per batched tokenizer call
# Files that decide how text becomes tokens; each one present is part of the cache key.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
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


def _tokenizer_fingerprint(tokenizer_path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Hash of the files that define the tokenizer (names and bytes)."""
    folder = Path(tokenizer_path)
    if not folder.is_dir():
        # A hub id: let transformers resolve it (from its cache when offline), then hash what it saves.
        with tempfile.TemporaryDirectory(prefix="ftflow-tok-") as tmp:
            load_tokenizer(tokenizer_path, revision=revision, trust_remote_code=trust_remote_code).save_pretrained(tmp)
            return _tokenizer_fingerprint(tmp)
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(p for p in extra.iterdir() if p.is_file())
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
        "code_version": TOKENIZE_CODE_VERSION,
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
    """(line number, parsed row) for every non-blank line; a broken line yields its exception."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
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


class _Builder:
    """Turns rows into (input_ids, labels) columns, chunk by chunk, counting what it drops and why."""

    def __init__(self, tokenizer, template_text: str, objective: str, train_on: str, max_length: int,
                 length_policy: str, source: Path):
        self.renderer = Renderer(tokenizer, template_text)
        self.backend = tokenizer.backend_tokenizer
        self.eos = tokenizer.eos_token or ""
        specials = sorted(special_tokens(tokenizer), key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.objective, self.train_on = objective, train_on
        self.max_length, self.length_policy, self.source = max_length, length_policy, source
        # Samples of the current chunk as Python lists; `flush` moves them into an Arrow table.
        self.ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.sample_ids: list[str] = []
        self.tables: list = []
        self.lengths: list[int] = []  # every kept sample's length, for the stats
        self.raw_lengths: list[int] = []
        self.rejects: list[dict] = []
        self.reasons: Counter = Counter()
        self.rows = self.truncated = self.dropped = self.trained = 0

    def _prepare(self, row: Any) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and trained character spans of one row, or a _Reject saying why not."""
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
            return text, [(0, len(text))]
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
            return self.renderer.spans(messages, self.objective, self.train_on)
        except TemplateError:
            raise  # the template itself is unusable: stop, don't reject every row
        except Exception as err:  # jinja raise_exception / TypeError on odd rows
            raise _Reject("template_error", f"{type(err).__name__}: {err}") from None

    def _reject(self, sid: str, line: int, reason: str, detail: str = "", length: int | None = None) -> None:
        self.reasons[reason] += 1
        if reason == "too_long":
            self.dropped += 1
        self.rejects.append({"id": sid, "line": line, "reason": reason, "detail": detail, "length": length})

    def add(self, rows: list[tuple[int, Any]]) -> None:
        texts, metas = [], []
        for line, row in rows:
            self.rows += 1
            sid = str(row.get("id")) if isinstance(row, dict) and row.get("id") is not None else f"line-{line}"
            try:
                text, spans = self._prepare(row)
                text.encode("utf-8")  # lone surrogates (e.g. "\ud800" in the JSON) cannot be tokenized
            except _Reject as r:
                self._reject(sid, line, r.reason, r.detail)
                continue
            except UnicodeEncodeError:
                self._reject(sid, line, "invalid_unicode", "text holds a lone surrogate code point")
                continue
            texts.append(text)
            metas.append((sid, line, spans))
        if not texts:
            return
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        pretrain = self.objective == "pretrain"
        for enc, (sid, line, spans) in zip(encodings, metas):
            ids = enc.ids
            n = len(ids)
            if pretrain:
                labels = list(ids)
                cuts = [(0, n)]
            else:
                labels = [IGNORE_INDEX] * n
                offsets = enc.offsets
                cuts, prev = [], 0
                for cs, ce in spans:
                    a = max(bisect_right(offsets, cs, key=_END), prev)  # first token ending after cs
                    b = bisect_left(offsets, ce, key=_START)  # first token starting at/after ce
                    if b > a:
                        labels[a:b] = ids[a:b]
                        cuts.append((a, b))
                        prev = b
            if n:
                labels[0] = IGNORE_INDEX  # position 0 is never a target
            self.raw_lengths.append(n)
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
                    continue
                n, truncated = self.max_length, True
                ids, labels = ids[:n], labels[:n]
            trained = sum(max(0, min(b, n) - max(a, 1)) for a, b in cuts)
            if trained == 0:
                reason = "no_trained_tokens_after_truncation" if truncated else "no_trained_tokens"
                detail = "the prompt fills tokenize.max_length" if truncated else "no token falls in a trained span"
                self._reject(sid, line, reason, detail, n)
                continue
            self.truncated += truncated
            self.trained += trained
            self.ids.append(ids)
            self.labels.append(labels)
            self.sample_ids.append(sid)
            self.lengths.append(n)

    def flush(self) -> None:
        """Move the chunk's samples into a compact Arrow table (less memory, less GC than lists)."""
        import pyarrow as pa

        if not self.ids:
            return
        self.tables.append(pa.table({
            "id": pa.array(self.sample_ids, type=pa.string()),
            "input_ids": pa.array(self.ids, type=pa.list_(pa.int32())),
            "labels": pa.array(self.labels, type=pa.list_(pa.int64())),
            "length": pa.array([len(x) for x in self.ids], type=pa.int32()),
        }))
        self.ids, self.labels, self.sample_ids = [], [], []

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

    builder.flush()
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


def _is_complete(folder: Path) -> bool:
    return (folder / "stats.json").is_file() and (folder / "dataset" / "state.json").is_file()


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
) -> TokenizeResult:
    """Tokenize a canonical JSONL file, or return the cached result of the same inputs."""
    if objective not in ("sft", "pretrain"):
        raise TokenizeError(f"tokenize.objective={objective!r}: choose sft or pretrain")
    if train_on not in ("all_assistant", "last_assistant"):
        raise TokenizeError(f"tokenize.train_on={train_on!r}: choose all_assistant or last_assistant")
    if length_policy not in ("drop", "truncate", "raise"):
        raise TokenizeError(f"tokenize.length_policy={length_policy!r}: choose drop, truncate or raise")
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise TokenizeError(f"{jsonl_path} does not exist; it is the data stage's output (canonical JSONL), run that first")
    cache_root = Path(cache_root)

    tokenizer = None
    if Path(tokenizer_path).is_dir():  # cheap path: no tokenizer load before we know it is a miss
        template_text = resolve_template(template, _TokenizerFiles(Path(tokenizer_path)))
    else:
        tokenizer = load_tokenizer(tokenizer_path, revision=revision, trust_remote_code=trust_remote_code)
        template_text = resolve_template(template, tokenizer)
    key = cache_key(jsonl_path, tokenizer_path, template_text, objective, train_on, max_length, length_policy,
                    revision=revision, trust_remote_code=trust_remote_code)
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
        tokenizer = load_tokenizer(tokenizer_path, revision=revision, trust_remote_code=trust_remote_code)
    if template in BUILTIN_TEMPLATES:  # checks the special tokens a built-in writes against the real tokenizer
        resolve_template(template, tokenizer)
    builder = _Builder(tokenizer, template_text, objective, train_on, max_length, length_policy, jsonl_path)
    log.info("tokenizing %s (template %s, objective %s, max_length %d) into %s",
             jsonl_path, template, objective, max_length, final)
    last_log, chunk = time.perf_counter(), []
    with _gc_paused():
        for item in _read_jsonl(jsonl_path):
            chunk.append(item)
            if len(chunk) >= CHUNK_ROWS:
                builder.add(chunk)
                builder.flush()
                chunk = []
                if time.perf_counter() - last_log > 10:
                    last_log = time.perf_counter()
                    log.info("tokenized %d rows (%.0f rows/s)", builder.rows, builder.rows / (last_log - t0))
        builder.add(chunk)

    stats = {
        **read,
        "template": template,
        "objective": objective,
        "train_on": train_on,
        "max_length": max_length,
        "length_policy": length_policy,
        "code_version": TOKENIZE_CODE_VERSION,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **builder.stats(),
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
    t = cfg.tokenize
    return tokenize_dataset(
        jsonl_path,
        model_path,
        cache_root=state_dir() / "cache" / "tokenized",
        template=t.template,
        objective=t.objective,
        train_on=t.train_on,
        max_length=t.max_length,
        length_policy=t.length_policy,
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

