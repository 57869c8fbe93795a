"""The tokenizer's encode in a child process on a faster malloc: the same tokens as in process,
the allocator really loaded, and every failure falls back without losing a row."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
from datasets import load_from_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import tasks.encode_process as ep
import tasks.tokenize as tk
from tasks.templates import BUILTIN_TEMPLATES
from tasks.tokenize import _Builder, tokenize_dataset
from tests.files import write_jsonl

# glibc's stub libraries: real shared objects that change nothing when preloaded (and, unlike libc,
# are not already loaded here, which would make ftflow encode in process).
PLACEBOS = ("libanl.so.1", "libutil.so.1")
WORDS = "apple river 床前明月光 🙂 e\u0301 \t\n [INST] <<SYS>> 。 don't 12345".split(" ")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def any_malloc() -> str:
    """The allocator auto-detection finds, else a placebo library: the child-process machinery is
    tested either way."""
    found = ep.find_malloc("auto") or next(
        (str(d / n) for n in PLACEBOS for d in ep._library_dirs() if (d / n).is_file()), None)
    if found is None:
        pytest.skip("no library to preload on this system")
    return found


@pytest.fixture(scope="module", params=[False, True], ids=["segments", "offsets"])
def child(request, tok):
    with ep.EncodeProcess(tok.backend_tokenizer, with_offsets=request.param, malloc=any_malloc()) as enc:
        yield enc


def test_find_malloc_settings(tmp_path, monkeypatch):
    for name in ("libjemalloc.so.2", "libmimalloc.so.2"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(ep, "_library_dirs", lambda: [tmp_path / "missing", tmp_path])
    assert ep.find_malloc("auto") == str(tmp_path / "libmimalloc.so.2")  # mimalloc before jemalloc
    (tmp_path / "libmimalloc.so.2").unlink()
    assert ep.find_malloc("") == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "libjemalloc.so.2").unlink()
    assert ep.find_malloc("auto") is None
    assert ep.find_malloc("off") is None and ep.find_malloc("OFF") is None
    explicit = tmp_path / "libcustom.so"
    explicit.write_bytes(b"")
    assert ep.find_malloc(str(explicit)) == str(explicit)
    with pytest.raises(FileNotFoundError, match=f"{ep.ENV}=/no/such.so: no such file"):
        ep.find_malloc("/no/such.so")
    monkeypatch.setenv(ep.ENV, "off")
    assert ep.find_malloc() is None
    monkeypatch.setattr(ep, "_mapped", lambda library, unknown=True: library == str(explicit))  # runs on it
    assert ep.find_malloc(str(explicit)) is None


def test_installed_allocator_is_really_loaded_in_the_child(tok):
    malloc = ep.find_malloc("auto")
    if malloc is None:
        if os.environ.get("CI"):  # .ci/run installs libmimalloc2.0
            pytest.fail("no mimalloc/jemalloc found under CI")
        pytest.skip("no mimalloc/jemalloc installed (apt-get install libmimalloc2.0)")
    with ep.EncodeProcess(tok.backend_tokenizer, with_offsets=False, malloc=malloc) as enc:
        flat, counts, offsets = enc.encode(["hello"])
        assert enc.preloaded is True and enc.describe() == f"child process, LD_PRELOAD={malloc}"
        pid = enc._proc.pid
        assert os.path.realpath(malloc) in Path(f"/proc/{pid}/maps").read_text()
    assert offsets is None and len(counts) == 8


@pytest.mark.parametrize("cores,expected", [({0, 1}, "true"), ({0}, "false")])
def test_child_sets_the_tokenizer_threads_for_its_cores_not_the_inherited_setting(tok, monkeypatch, cores, expected):
    # The CLI's process runs with TOKENIZERS_PARALLELISM=false (infra.local); the child must not
    # inherit it on 2+ cores. Read from the live child's own environment, as the kernel holds it.
    if not Path("/proc/self/environ").exists():
        pytest.skip("no procfs")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false" if expected == "true" else "true")
    monkeypatch.setattr(ep.os, "sched_getaffinity", lambda pid: cores, raising=False)
    with ep.EncodeProcess(tok.backend_tokenizer, with_offsets=False, malloc=any_malloc()) as enc:
        enc.encode(["hello"])
        environ = Path(f"/proc/{enc._proc.pid}/environ").read_bytes().split(b"\0")
    assert f"TOKENIZERS_PARALLELISM={expected}".encode() in environ


def test_a_library_that_cannot_be_preloaded_is_reported(tmp_path, tok, caplog):
    bogus = tmp_path / "libnotmalloc.so"
    bogus.write_text("not an ELF file")
    with caplog.at_level(logging.WARNING), ep.EncodeProcess(tok.backend_tokenizer, with_offsets=False, malloc=str(bogus)) as enc:
        flat, counts, _ = enc.encode(["hello world"])
        assert enc.preloaded is False and "could not be preloaded" in enc.describe()
    assert "could not preload" in caplog.text
    assert list(memoryview(flat).cast("i")) == tok("hello world", add_special_tokens=False).input_ids


def test_child_error_is_reported_and_the_child_survives(child, tok):
    with pytest.raises(ep.EncodeProcessError, match="the tokenizer process failed: TypeError"):
        child.encode([1, 2])  # not text
    flat, counts, _ = child.encode(["still here"])
    assert list(memoryview(flat).cast("i")) == tok("still here", add_special_tokens=False).input_ids


conversation = st.lists(
    st.tuples(st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join),
              st.one_of(st.text(max_size=30), st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join))),
    min_size=1, max_size=3,
).map(lambda turns: {"id": "x", "messages": [m for u, a in turns for m in (
    {"role": "user", "content": u}, {"role": "assistant", "content": a})]})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("template", ["chatml", "llama2"])
@given(rows=st.lists(conversation, min_size=1, max_size=8), objective=st.sampled_from(["sft", "pretrain"]))
def test_child_encodes_exactly_like_this_process(tok, child, template, rows, objective):
    def build(encoder) -> _Builder:
        b = _Builder(tok, BUILTIN_TEMPLATES[template], objective, "all_assistant", 64, "truncate", Path("in.jsonl"))
        if child.with_offsets:
            b.segmentwise = False  # the whole-text path (tokenizers that prepend to every text)
        b.encoder = encoder
        b.add(list(enumerate(rows, 1)))
        return b

    here, there = build(None), build(child)
    assert there.encoder is child  # no fallback happened
    assert here.samples() == there.samples()
    assert here.rejects == there.rejects and here.stats() == there.stats()


def _rows(n: int) -> list[dict]:
    rng = random.Random(0)
    say = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))  # noqa: E731
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]}
            for i in range(n)]


def _tokenize(tmp_path: Path, model_dir, name: str, malloc: str, monkeypatch):
    monkeypatch.setenv(ep.ENV, malloc)
    return tokenize_dataset(tmp_path / "in.jsonl", str(model_dir), cache_root=tmp_path / name, max_length=160,
                            length_policy="truncate")


@pytest.fixture()
def many_chunks(tmp_path, monkeypatch):
    """A JSONL over several chunks, every size taking the child-process path."""
    write_jsonl(tmp_path / "in.jsonl", _rows(50) + ["{not json"])
    monkeypatch.setattr(tk, "ENCODE_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(tk, "CHUNK_ROWS", 8)


def _same(a, b) -> None:
    assert a.key == b.key
    assert load_from_disk(str(a.path)).data.table.equals(load_from_disk(str(b.path)).data.table)
    drop = lambda s: {k: v for k, v in s.items() if k not in ("encoder", "build_seconds")}  # noqa: E731
    assert drop(a.stats) == drop(b.stats)
    assert a.rejects_path.read_text() == b.rejects_path.read_text()


def test_cache_is_identical_with_and_without_the_child(tmp_path, tiny_model_dir, many_chunks, monkeypatch):
    malloc = any_malloc()
    inline = _tokenize(tmp_path, tiny_model_dir, "inline", "off", monkeypatch)
    child = _tokenize(tmp_path, tiny_model_dir, "child", malloc, monkeypatch)
    assert inline.stats["encoder"] == "in process"
    assert inline.stats["samples"] >= 30 and inline.stats["truncated"] > 0 and inline.stats["rejected"]["bad_json"] == 1
    assert child.stats["encoder"] == f"child process, LD_PRELOAD={malloc}"
    _same(inline, child)


def test_child_dying_mid_build_falls_back_without_losing_rows(tmp_path, tiny_model_dir, many_chunks, monkeypatch, caplog):
    calls = []

    class Dies(ep.EncodeProcess):
        def encode(self, texts):
            calls.append(len(texts))
            if len(calls) == 3:
                self._proc.kill()
                self._proc.wait()
            return super().encode(texts)

    inline = _tokenize(tmp_path, tiny_model_dir, "inline", "off", monkeypatch)
    monkeypatch.setattr(tk, "EncodeProcess", Dies)
    with caplog.at_level(logging.WARNING):
        fell_back = _tokenize(tmp_path, tiny_model_dir, "dies", any_malloc(), monkeypatch)
    assert 3 <= len(calls) <= 4  # two batches in the child, then it was dead (a 4th may have been on its way)
    assert "encoding the rest in this process" in caplog.text
    assert fell_back.stats["encoder"] == "in process (the tokenizer process failed)"
    _same(inline, fell_back)


def test_child_that_cannot_start_falls_back(tmp_path, tiny_model_dir, many_chunks, monkeypatch, caplog):
    def cannot_start(*args, **kwargs):
        raise ep.EncodeProcessError("the tokenizer process did not start: [Errno 12] Cannot allocate memory")

    inline = _tokenize(tmp_path, tiny_model_dir, "inline", "off", monkeypatch)
    monkeypatch.setattr(tk, "EncodeProcess", cannot_start)
    with caplog.at_level(logging.WARNING):
        result = _tokenize(tmp_path, tiny_model_dir, "nostart", any_malloc(), monkeypatch)
    assert "did not start" in caplog.text and result.stats["encoder"] == "in process"
    _same(inline, result)


def test_missing_allocator_path_is_a_clear_error(tmp_path, tiny_model_dir, many_chunks, monkeypatch):
    with pytest.raises(tk.TokenizeError, match=f"{ep.ENV}=/no/such/libmimalloc.so: no such file"):
        _tokenize(tmp_path, tiny_model_dir, "missing", "/no/such/libmimalloc.so", monkeypatch)


def test_small_inputs_stay_in_process(tmp_path, tiny_model_dir, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", _rows(5))
    assert _tokenize(tmp_path, tiny_model_dir, "small", any_malloc(), monkeypatch).stats["encoder"] == "in process"
