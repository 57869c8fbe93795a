"""Preflight of the machine: checks that run before Prefect or MLflow start, each one paragraph
naming the path, URL or key and what to do. Table-driven: case -> the fragment its message holds."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from ftflow.config import load_config
from tasks.preflight import PreflightError, check, estimate_output_bytes, probe_tracking_server

ROW = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'


def _config(tmp_path: Path, train: str = "d.jsonl", extra: list[str] | None = None):
    (tmp_path / "d.jsonl").write_text(ROW)
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{train: [{train}]}}\nmodel: {{name_or_path: 'embedded:tiny-qwen2'}}\n"
                 "train: {deepspeed: null, nproc_per_node: 1}\n")
    return load_config(p, extra or [])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connecting is refused


@pytest.fixture()
def silent_server():
    """Accepts connections and never answers: the probe must give up after its timeout."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _setup_unsupported(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("instruction,output\n")
    return ["data.train=[notes.txt]"]


def _setup_empty_folder(tmp_path, monkeypatch):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "readme.md").write_text("no data here")
    return ["data.train=[raw]"]


def _setup_home_is_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "afile" / "home"))
    return []


def _setup_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    return []


def _setup_sqlite_unwritable(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}")
    return []


def _setup_disk_full(tmp_path, monkeypatch):
    import shutil

    from tasks import preflight

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"dtype": "float32"}))
    (model / "model.safetensors").write_bytes(b"\0" * 4_000_000)  # 1M fp32 parameters
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=10_000_000))
    monkeypatch.setattr(preflight, "_model_problems", lambda cfg: [])  # not a real model: only its size counts
    return [f"model.name_or_path={model}"]


CASES = [
    # case, setup, expected fragment
    ("unsupported data file type", _setup_unsupported, "data.train: 'notes.txt'"),
    ("unsupported data file type", _setup_unsupported, "unsupported file type"),
    ("folder without data files", _setup_empty_folder, "holds no supported data files"),
    ("FTFLOW_HOME not writable", _setup_home_is_under_a_file, "FTFLOW_HOME:"),
    ("tracking server refuses", _setup_refused, "is unreachable (Connection refused)"),
    ("local MLflow store not writable", _setup_sqlite_unwritable, "cannot be written"),
    ("disk too small for the outputs", _setup_disk_full, "only 0.0 GB are free"),
]


@pytest.mark.parametrize("case, setup, fragment", CASES, ids=[c[0] + "-" + str(i) for i, c in enumerate(CASES)])
def test_preflight_names_the_problem(tmp_path, monkeypatch, case, setup, fragment):
    monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = setup(tmp_path, monkeypatch)
    cfg = _config(tmp_path, extra=extra)
    t0 = time.monotonic()
    with pytest.raises(PreflightError) as err:
        check(cfg)
    assert fragment in str(err.value)
    assert "Traceback" not in str(err.value)
    assert time.monotonic() - t0 < 10


def test_good_setup_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check(_config(tmp_path))
    assert not [p for p in (tmp_path / "home").iterdir() if p.name.startswith(".tmp-preflight")]  # probe removed
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ  # checking changes no setting a later step reads


def test_silent_server_fails_in_seconds(silent_server):
    t0 = time.monotonic()
    why = probe_tracking_server(silent_server, timeout_s=1.0)
    assert why == "no answer within 1 s"
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("status", [200, 401, 404])
def test_any_http_answer_counts_as_reachable(status):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert probe_tracking_server(f"http://127.0.0.1:{server.server_address[1]}") is None
    finally:
        server.shutdown()


def test_output_estimate(tmp_path):
    """1M fp32 parameters (4 MB of weights): full training with 2 checkpoints kept writes
    (16 B x 3 checkpoint-like states + 8 B export and MLflow copy) x 1M = 56 MB, plus the input data 4x,
    plus 10%. LoRA without merging: 8 B x 1M / 20; with merging 8 MB."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"dtype": "float32"}))
    (model / "model.safetensors").write_bytes(b"\0" * 4_000_000)
    data = len(ROW)
    full, how = estimate_output_bytes(_config(tmp_path, extra=[f"model.name_or_path={model}"]))
    assert full == int((1_000_000 * 56 + 4 * data) * 1.1)
    assert "full training, 2 checkpoint(s) kept" in how
    lora, _ = estimate_output_bytes(_config(tmp_path, extra=[f"model.name_or_path={model}", "train.mode=lora"]))
    assert lora == int((1_000_000 * 8 // 20 + 4 * data) * 1.1)
    merged, _ = estimate_output_bytes(_config(tmp_path, extra=[f"model.name_or_path={model}", "train.mode=lora",
                                                               "train.lora.merge=true"]))
    assert merged == int((8_000_000 + 4 * data) * 1.1)
    (model / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))  # 2M 16-bit parameters
    assert estimate_output_bytes(_config(tmp_path, extra=[f"model.name_or_path={model}"]))[0] == int(
        (2_000_000 * 56 + 4 * data) * 1.1)
