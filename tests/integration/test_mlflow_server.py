"""The registry stage against a real `mlflow server` (REST store, proxied artifacts), bound to 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    port = _free_port()
    artifacts = tmp_path / "artifacts"
    log_file = (tmp_path / "server.log").open("w")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", artifacts.as_uri()],
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: stop it and its workers
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not become healthy within 120 s")
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("FTFLOW_HOME", str(tmp_path / "home"))
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


def test_register_alias_and_serve_through_server(mlflow_server, tiny_model_dir):
    import mlflow

    from infra.local import ensure_experiment
    from tasks.evaluate import generate_batch, load_for_inference
    from tasks.registry import apply_promotion, current_champion, register_model, rollback_cli

    url, artifacts = mlflow_server
    client = mlflow.MlflowClient()
    assert client._tracking_client.tracking_uri == url
    rid = client.create_run(ensure_experiment("server-test")).info.run_id

    v1 = register_model(tiny_model_dir, model_name="srv", run_id=rid, fingerprint="f1", tags={"k": "v"})
    again = register_model(tiny_model_dir, model_name="srv", run_id=rid, fingerprint="f1", tags={"k": "v"})
    assert (v1.version, again.version, again.existed) == ("1", "1", True)
    assert any(artifacts.rglob("model.safetensors"))  # uploaded through the server's artifact proxy

    win = {"promote": True, "reason": "first", "metric": "exact_match", "challenger_score": 0.1,
           "champion_score": 0.0, "delta": 0.1}
    apply_promotion("srv", v1.version, win)
    v2 = register_model(tiny_model_dir, model_name="srv", run_id=rid, fingerprint="f2", tags={})
    apply_promotion("srv", v2.version, win)
    assert current_champion("srv") == "2"
    assert str(client.get_model_version_by_alias("srv", "challenger").version) == "2"

    pyf = mlflow.pyfunc.load_model("models:/srv@champion")
    out = pyf.predict({"messages": [{"role": "user", "content": "Reverse the words: apple river"}], "max_tokens": 4})
    assert out[0]["choices"][0]["message"]["role"] == "assistant"

    model, tok, _ = load_for_inference("models:/srv@champion")
    reply = generate_batch(model, tok, [[{"role": "user", "content": "hi"}]], {"max_new_tokens": 3}, 1)
    assert reply[0]["new_tokens"] == 3

    assert rollback_cli("srv", why="test") == 0
    assert current_champion("srv") == "1"
