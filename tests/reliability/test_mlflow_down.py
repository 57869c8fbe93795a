"""The MLflow server goes down in the middle of a registration: retried with backoff, then a clear
failure; no version and no alias half-made; once the server is back, re-running completes."""

from __future__ import annotations

import time

import pytest

from tests.servers import MlflowServer

pytestmark = pytest.mark.integration


def test_server_down_during_registration_then_rerun_completes(tmp_path, monkeypatch, tiny_model_dir):
    import mlflow

    from tasks import registry

    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # MLflow's own HTTP retries: keep the test short
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        client = mlflow.MlflowClient(server.uri)
        exp = client.create_experiment("down")
        run_id = client.create_run(exp).info.run_id

        real_register = mlflow.register_model

        def server_dies_first(*a, **k):  # the model is logged; the server dies before the version exists
            server.stop()
            return real_register(*a, **k)

        monkeypatch.setattr(mlflow, "register_model", server_dies_first)
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            registry.register_model(tiny_model_dir, model_name="m", run_id=run_id, fingerprint="fp-1", tags={})
        assert "Connection refused" in str(err.value) or "connect" in str(err.value).lower()
        assert time.monotonic() - t0 < 300

        server.start()  # same port, same store: the server is back
        assert client.search_model_versions("name='m'") == []  # nothing half-registered
        with pytest.raises(Exception):
            client.get_model_version_by_alias("m", "challenger")
        monkeypatch.setattr(mlflow, "register_model", real_register)
        rv = registry.register_model(tiny_model_dir, model_name="m", run_id=run_id, fingerprint="fp-1", tags={})
        assert rv.version == "1" and not rv.existed
        versions = client.search_model_versions("name='m'")
        assert [str(v.version) for v in versions] == ["1"] and versions[0].status == "READY"
        assert str(client.get_model_version_by_alias("m", "challenger").version) == "1"
        again = registry.register_model(tiny_model_dir, model_name="m", run_id=run_id, fingerprint="fp-1", tags={})
        assert again.existed and again.version == "1"
    finally:
        server.stop()
