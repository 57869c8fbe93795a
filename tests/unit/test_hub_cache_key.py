"""One content key for the tokenized set of a hub model: the commit it resolves to and its tokenizer files.

A hub-style model folder is built in the Hugging Face cache layout (`models--org--name/refs/main`,
`snapshots/<commit>/`) under a temporary HF_HOME, offline. Changing the chat template (in a new
snapshot, or in place) must be a cache miss with new tokens, in the folder key and in the Prefect
task layer's key alike (they are the same key); an unchanged rerun is a hit.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from datasets import load_from_disk

from tasks import tokenize as tk
from tasks.base_model import hub_snapshot, model_fingerprint

ROWS = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"reverse: a b {i}"},
                                     {"role": "assistant", "content": f"{i} b a"}]} for i in range(4)]
C1, C2 = "1" * 40, "2" * 40
NOTE = "{{- 'Note.\\n' }}"


@pytest.fixture()
def hub(tmp_path, monkeypatch, tiny_model_dir):
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--org--name"

    def publish(commit: str, template_prefix: str = "") -> object:
        snap = repo / "snapshots" / commit
        shutil.copytree(tiny_model_dir, snap)
        jinja = snap / "chat_template.jinja"
        base = jinja.read_text(encoding="utf-8") if jinja.is_file() else \
            json.loads((snap / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
        jinja.write_text(template_prefix + base, encoding="utf-8")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return snap

    return publish


def _cfg():
    return SimpleNamespace(
        tokenize=SimpleNamespace(template="auto", objective="sft", train_on="all_assistant", max_length=512,
                                 length_policy="drop", multi_turn="auto"),
        model=SimpleNamespace(revision=None, trust_remote_code=False))


def _run(tmp_path, jsonl):
    from tasks import stages

    prefect_key = stages._tokenize_cache_key(None, {"cfg": _cfg(), "train_jsonl": str(jsonl),
                                                    "base": SimpleNamespace(path="org/name")})
    res = tk.tokenize_dataset(jsonl, "org/name", cache_root=tmp_path / "cache")
    assert prefect_key == "tokenize-" + res.key  # one key: the Prefect layer has no key of its own
    return res, [list(r) for r in load_from_disk(str(res.path))["input_ids"]]


def test_hub_model_resolves_to_its_commit(hub, tmp_path):
    snap = hub(C1)
    assert hub_snapshot("org/name") == (snap, C1)
    fp = model_fingerprint("org/name")
    assert fp != "org/name" and fp == model_fingerprint("org/name")
    hub(C2)
    assert hub_snapshot("org/name")[1] == C2 and model_fingerprint("org/name") != fp
    assert hub_snapshot("org/name", C1) == (snap, C1)  # a pinned commit stays on it


def test_changed_template_is_a_miss_unchanged_is_a_hit(hub, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    hub(C1)
    first, ids1 = _run(tmp_path, jsonl)
    again, _ = _run(tmp_path, jsonl)
    assert not first.hit and again.hit and again.key == first.key

    snap2 = hub(C2, NOTE)  # upstream publishes a new template under the same id, revision null
    second, ids2 = _run(tmp_path, jsonl)
    assert not second.hit and second.key != first.key
    assert ids2 != ids1 and all(len(b) > len(a) for a, b in zip(ids1, ids2))

    jinja = snap2 / "chat_template.jinja"  # the same commit's file edited in place
    jinja.write_text(NOTE + jinja.read_text(encoding="utf-8"), encoding="utf-8")
    third, ids3 = _run(tmp_path, jsonl)
    assert not third.hit and third.key not in (first.key, second.key)
    assert all(len(c) > len(b) for b, c in zip(ids2, ids3))
