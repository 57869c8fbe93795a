"""Faults injected for real: processes killed with SIGKILL mid-write, a disk that fills up.
Nothing partial is ever taken for complete, and the next run completes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def _script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "child.py"
    p.write_text(textwrap.dedent(body))
    return p


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FTFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}


@pytest.fixture()
def canonical_jsonl(tmp_path) -> Path:
    """20k canonical chat samples: enough that tokenizing takes a moment to interrupt."""
    p = tmp_path / "train.jsonl"
    with p.open("w") as f:
        for i in range(20000):
            msgs = [{"role": "user", "content": f"question {i} " + "lorem ipsum " * 8},
                    {"role": "assistant", "content": f"answer {i} " + "dolor sit " * 8}]
            f.write(json.dumps({"id": f"s{i}", "messages": msgs}) + "\n")
    return p


def test_kill_during_tokenization_never_leaves_a_cache_hit(tmp_path, canonical_jsonl, tiny_model_dir):
    cache = tmp_path / "cache"
    child = _script(tmp_path, f"""
        import sys
        from tasks.tokenize import tokenize_dataset
        r = tokenize_dataset({str(canonical_jsonl)!r}, {str(tiny_model_dir)!r}, cache_root=__import__('pathlib').Path({str(cache)!r}))
        print("HIT" if r.hit else "BUILT", r.key, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, str(child)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    # The build writes into a hidden temporary folder; kill the process while it exists.
    assert wait_for(lambda: cache.exists() and any(p.name.startswith(".tmp-") for p in cache.iterdir())), "build never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = [p for p in cache.iterdir() if not p.name.startswith(".tmp-")]
    assert complete == []  # nothing that a later run could take for a hit
    out = subprocess.run([sys.executable, str(child)], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("BUILT")
    again = subprocess.run([sys.executable, str(child)], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.stdout.startswith("HIT") and again.stdout.split()[1] == out.stdout.split()[1]


def _fake_final(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A complete non-DeepSpeed training output (the Trainer's HF folder + ftflow's marker)."""
    from tasks.train_worker import COMPLETE_MARKER

    final = tmp_path / "final"
    shutil.copytree(tiny_model_dir, final)
    (final / COMPLETE_MARKER).write_text("{}")
    return final


def test_kill_during_consolidation_never_leaves_a_model_folder(tmp_path, tiny_model_dir):
    final = _fake_final(tmp_path, tiny_model_dir)
    out = tmp_path / "export"
    child = _script(tmp_path, f"""
        import time
        import tasks.consolidate as c
        original = c.export_full
        def slow(*a, **k):
            original(*a, **k)            # weights fully written into the temporary folder ...
            print("WRITTEN", flush=True)
            time.sleep(120)              # ... and killed before the rename
        c.export_full = slow
        c.consolidate({str(final)!r}, {str(tiny_model_dir)!r}, {str(out)!r})
    """)
    proc = subprocess.Popen([sys.executable, str(child)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITTEN"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-export")]  # the partial folder is hidden
    from tasks.consolidate import consolidate

    consolidate(final, str(tiny_model_dir), out)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_disk_full_while_converting_names_the_path_and_damages_nothing(tmp_path):
    src = tmp_path / "big.jsonl"
    with src.open("w") as f:
        for i in range(20000):
            f.write(json.dumps({"instruction": f"q{i} " + "x" * 50, "input": "", "output": "y" * 60}) + "\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    registered = out_dir / "model-v1.safetensors"  # something written earlier that must survive
    registered.write_bytes(b"previous output")
    child = _script(tmp_path, """
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from ftflow.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, str(child), "convert", str(src), "--out", str(out_dir / "data.jsonl")],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"could not write {out_dir / 'data.jsonl'}" in proc.stderr and "Traceback" not in proc.stderr
    assert registered.read_bytes() == b"previous output"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model-v1.safetensors"]
