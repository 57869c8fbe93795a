"""A hub model id is checked in seconds (issue #17): loadable when cached or when the hub answers;
otherwise one message that says what to do, instead of a minute of retries and six tracebacks."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from tasks import base_model
from tasks.base_model import hub_model_problem

REPO_ID = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache in tmp_path, online mode, and the hub endpoint on a closed port."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # set (not deleted) so that the code's own setting is undone too
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "")
    return constants


def _cache(root: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/config.json}."""
    rev = "a" * 40
    d = root / ("models--" + repo_id.replace("/", "--"))
    (d / "snapshots" / rev).mkdir(parents=True)
    (d / "snapshots" / rev / "config.json").write_text("{}")
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(rev)


def test_unreachable_hub_and_not_cached_is_one_message_in_seconds(hub):
    t0 = time.monotonic()
    msg = hub_model_problem(REPO_ID)
    assert time.monotonic() - t0 < base_model.HUB_PROBE_TIMEOUT_S + 1
    assert msg is not None
    for frag in ("is a Hugging Face Hub id, but the hub (http://127.0.0.1:9) cannot be reached",
                 "not in the local cache", f"hf download {REPO_ID} --local-dir models/Qwen2.5-0.5B-Instruct",
                 "point model.name_or_path"):
        assert frag in msg, msg


def test_cached_model_with_unreachable_hub_loads_offline(hub, monkeypatch):
    _cache(Path(hub.HF_HUB_CACHE), REPO_ID)
    assert hub_model_problem(REPO_ID) is None
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE is True  # no retries from here on


def test_offline_mode_and_not_cached(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = hub_model_problem(REPO_ID)
    assert msg and "HF_HUB_OFFLINE=1 forbids downloading it" in msg
    _cache(Path(hub.HF_HUB_CACHE), REPO_ID)
    assert hub_model_problem(REPO_ID) is None


def test_reachable_hub_is_left_to_from_pretrained(hub, monkeypatch):
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server API
            self.send_response(404)  # any answer means reachable
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_model_problem(REPO_ID) is None
    finally:
        server.shutdown()
