"""The whole flow against a real `mlflow server` process (REST store, proxied artifacts, 127.0.0.1).

`ftflow run` (small: 1 epoch, 10 eval rows) runs twice with the same config, as a subprocess with
MLFLOW_TRACKING_URI pointing at the server and canary secrets in its environment. Then:
lineage on the MLflow runs and the registered version, one version for two identical runs, the
champion served by alias (pyfunc and `ftflow generate`), the `evaluate` flow recording its scores on
the version, and guarded promotion / rollback through the `promote` and `rollback` flows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NAME = "ftflow-srv"
CANARIES = {"HF_TOKEN": "hf_canaryCANARYcanary0123456789", "MLFLOW_TRACKING_PASSWORD": "pw-canary-5f3e9a1c"}
# char_f1: after 1 epoch exact match may still tie with the base model (0), char F1 does not
SMALL = ["--set", "train.epochs=1", "--set", "eval.max_samples=10", "--set", f"registry.model_name={NAME}",
         "--set", "promote.metric=char_f1"]

# the ephemeral Prefect API gets 20 s to start by default; a loaded 2-core CI machine needs more
SLOW_MACHINE = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port: SQLite backend, artifacts proxied into a tmp folder."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port, artifacts = _free_port(), tmp / "artifacts"
    log_path = tmp / "server.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
             "--serve-artifacts", "--artifacts-destination", artifacts.as_uri()],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,  # own group: stop it with its workers
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not become healthy within 120 s")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return {**env, "FTFLOW_HOME": str(home), "MLFLOW_TRACKING_URI": url, **SLOW_MACHINE, **CANARIES}


def _ftflow(home: Path, url: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ftflow.cli", *args], cwd=REPO, env=_env(home, url),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    """Two identical `ftflow run`s against the server; this process then talks to the same server."""
    url, artifacts = server
    home = tmp_path_factory.mktemp("flow-home")
    summaries = []
    for i in range(2):
        path = home / f"summary-{i}.json"
        _ftflow(home, url, "run", "configs/demo.yaml", *SMALL, "--summary-json", str(path))
        summaries.append(json.loads(path.read_text()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", url)
        mp.setenv("FTFLOW_HOME", str(home / "client"))
        (home / "client" / "prefect").mkdir(parents=True)
        mp.setenv("PREFECT_HOME", str(home / "client" / "prefect"))  # the in-process flows' ephemeral API
        for k, v in SLOW_MACHINE.items():
            mp.setenv(k, v)
        import mlflow

        yield {"url": url, "artifacts": artifacts, "home": home, "first": summaries[0], "second": summaries[1],
               "client": mlflow.MlflowClient(url)}


def test_same_config_twice_gives_one_version(runs):
    first, second, client = runs["first"], runs["second"], runs["client"]
    assert (first["version"], first["already_registered"]) == ("1", False)
    assert (second["version"], second["already_registered"]) == ("1", True)
    assert second["training"]["reused"] is True
    assert [mv.version for mv in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert first["promoted"] is True  # beats the base model
    assert any(runs["artifacts"].rglob("model.safetensors"))  # uploaded through the server's artifact proxy


def test_lineage_on_runs_and_version(runs):
    from ftflow.config import load_config
    from tasks.lineage import flatten

    first, client = runs["first"], runs["client"]
    run = client.get_run(first["mlflow_run_id"])
    tags, params = run.data.tags, run.data.params

    for key in ("ftflow.data_sha256", "ftflow.eval_data_sha256", "ftflow.tokenized_cache_key", "ftflow.git_commit",
                "ftflow.base_model", "ftflow.base_model_revision", "ftflow.prefect_flow_run_id", "ftflow.prefect_ui",
                *(f"ftflow.version.{lib}" for lib in ("torch", "transformers", "peft", "deepspeed", "prefect"))):
        assert tags.get(key), key
    assert tags["ftflow.base_model"] == "embedded:tiny-qwen2"
    assert tags["ftflow.prefect_flow_run_id"] == first["prefect_flow_run_id"]
    assert len(tags["ftflow.tokenized_cache_key"]) >= 16 and len(tags["ftflow.data_sha256"]) == 64

    # params: the whole resolved config, nothing hidden that is not a secret
    cfg = load_config(str(REPO / "configs/demo.yaml"), SMALL[1::2]).model_dump(mode="json")
    expected = {k: str(v) for k, v in flatten(cfg).items()}
    assert set(expected) - {"base_dir"} <= set(params)
    for key in ("tokenize.max_length", "eval.generation.max_new_tokens", "train.epochs", "registry.model_name"):
        assert params[key] == expected[key], key
    everything = json.dumps([params, tags, dict(client.get_registered_model(NAME).tags)])
    for canary in CANARIES.values():
        assert canary not in everything

    def artifacts(run_id: str, folder: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, folder)}

    rid = run.info.run_id
    assert {"data/report.json", "data/tokenize_stats.json", "data/length_histogram.png"} <= artifacts(rid, "data")
    assert "eval/challenger_table.json" in artifacts(rid, "eval")
    local = Path(client.download_artifacts(rid, "config/resolved_config.yaml", str(runs["home"] / "dl")))
    assert yaml.safe_load(local.read_text())["train"]["epochs"] == 1

    children = {c.info.run_name: c for c in client.search_runs([run.info.experiment_id],
                                                                 f"tags.mlflow.parentRunId = '{rid}'")}
    assert {"train", "eval-challenger", "eval-champion"} <= set(children)
    train_id = children["train"].info.run_id
    assert {"training/loss_curve.png", "training/deepspeed_config.json"} <= artifacts(train_id, "training")
    png = Path(client.download_artifacts(train_id, "training/loss_curve.png", str(runs["home"] / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    challenger_id = children["eval-challenger"].info.run_id
    assert "eval/challenger_table.json" in artifacts(challenger_id, "eval")
    # the same scores through MLflow's GenAI evaluation: an assessed trace per held-out example
    import mlflow

    mlflow.set_tracking_uri(runs["url"])
    child = client.get_run(challenger_id)
    assert child.data.metrics["exact_match/mean"] == pytest.approx(child.data.metrics["challenger/exact_match"])
    traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=challenger_id, return_type="list")
    assert len(traces) == child.data.metrics["challenger/n"]
    assert all({"exact_match", "char_f1", "rouge_l", "bleu"} <= {a.name for a in t.info.assessments} for t in traces)

    # the version links back to its run, data and scores
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["ftflow.run_id"] == rid
    assert mv.tags["ftflow.data_sha256"] == tags["ftflow.data_sha256"]
    assert mv.tags["ftflow.tokenized_cache_key"] == tags["ftflow.tokenized_cache_key"]
    assert mv.tags["ftflow.eval.run_id"] in {c.info.run_id for c in children.values()} | {
        c.info.run_id for c in client.search_runs([run.info.experiment_id], "tags.mlflow.runName = 'eval-challenger'")}
    scored = float(mv.tags["ftflow.eval.metric.exact_match"])
    assert scored == pytest.approx(first["scores"]["challenger"]["exact_match"], abs=1e-4)
    assert mv.tags["ftflow.promotion.promote"] == "true" and mv.tags["ftflow.promotion.reason"]


def test_champion_serves_by_alias(runs):
    import mlflow

    pyf = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = pyf.predict({"messages": [{"role": "user", "content": "Reverse the words: apple river"}], "max_tokens": 8})
    message = out[0]["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()

    proc = _ftflow(runs["home"], runs["url"], "generate", "--model", f"models:/{NAME}@champion",
                   "--max-new-tokens", "12", "Reverse the words: apple river", timeout=300)
    assert proc.stdout.strip(), proc.stderr[-2000:]


def test_evaluate_flow_records_scores_on_the_version(runs, capsys):
    from flows.evaluate import eval_cli

    client = runs["client"]
    # what `ftflow eval --model models:/NAME@champion --data FILE --max-samples 4` runs
    assert eval_cli(f"models:/{NAME}@champion", str(REPO / "data/demo/reverse_eval.jsonl"), 4, 8, 12,
                    generation={"repetition_penalty": 1.1}, experiment="ftflow-eval") == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and f"recorded on {NAME} version 1" in out
    (run,) = client.search_runs([client.get_experiment_by_name("ftflow-eval").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id in out
    assert {"eval/exact_match", "eval/char_f1", "eval/rouge_l", "eval/bleu", "eval/loss", "eval/perplexity",
            "eval/no_stop_rate"} <= set(run.data.metrics)
    assert run.data.metrics["eval/n"] == 4
    assert run.data.params["model"] == f"models:/{NAME}@champion" and run.data.tags["ftflow.model_version"] == "1"
    assert run.data.params["generation.repetition_penalty"] == "1.1"
    assert run.data.tags["ftflow.prefect_flow_run_id"] not in ("", "local")
    assert "eval/eval_table.json" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert run.data.metrics["exact_match/mean"] == pytest.approx(run.data.metrics["eval/exact_match"])
    assert client.get_model_version(NAME, "1").tags["ftflow.eval.run_id"] == run.info.run_id


def test_guarded_promotion_and_rollback(runs):
    from flows.promote import promote, rollback
    from tasks.registry import (
        PromotionRefused, apply_promotion, current_champion, decide_promotion, logged_model_id, record_eval,
        version_eval_metrics,
    )

    client = runs["client"]
    v1 = client.get_model_version(NAME, "1")
    # two more versions of the same logged model: enough for alias and tag logic
    v2, v3 = (client.create_model_version(NAME, v1.source, run_id=v1.run_id, model_id=logged_model_id(v1)).version
              for _ in range(2))
    rule = {"metric": "exact_match", "min_improvement": 0.0, "no_regress": ["char_f1"]}
    champion = version_eval_metrics(NAME, "1")
    assert current_champion(NAME) == "1"

    with pytest.raises(PromotionRefused, match="no scored inference run"):
        promote(NAME, v2, why="looks fine")
    assert current_champion(NAME) == "1"

    worse = {"exact_match": champion["exact_match"] - 0.1, "char_f1": champion["char_f1"] - 0.1}
    record_eval(NAME, v2, run_id="literal-worse", metrics=worse)
    d = decide_promotion(worse, champion, **rule)
    apply_promotion(NAME, v2, d, who="test", why=d["reason"])
    assert d["promote"] is False and current_champion(NAME) == "1"
    assert client.get_model_version(NAME, v2).tags["ftflow.promotion.promote"] == "false"

    better = {"exact_match": champion["exact_match"] + 0.1, "char_f1": champion["char_f1"] + 0.01}
    record_eval(NAME, v3, run_id="literal-better", metrics=better)
    d = decide_promotion(better, champion, **rule)
    apply_promotion(NAME, v3, d, who="test", why=d["reason"])
    assert d["promote"] is True and current_champion(NAME) == v3
    assert client.get_model_version(NAME, v3).tags["ftflow.promotion.previous_champion"] == "1"

    r = rollback(NAME, why="bad replies", who="alice")
    assert (r["from"], r["to"]) == (v3, "1") and current_champion(NAME) == "1"
    tags = client.get_model_version(NAME, v3).tags
    assert tags["ftflow.rollback.why"] == "bad replies" and tags["ftflow.rollback.who"].startswith("alice")

    # a person may still promote the scored-but-worse version on purpose; who and why are kept
    r = promote(NAME, v2, why="manual review", who="bob")
    assert r["previous_champion"] == "1" and current_champion(NAME) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags["ftflow.promotion.who"].startswith("bob") and tags["ftflow.promotion.why"] == "manual review"
