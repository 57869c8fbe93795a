"""Lineage: secret redaction on literal configs, params and tags of a parent run, the loss-curve PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lineage import (
    REDACTED,
    flatten,
    git_commit,
    is_secret_key,
    library_versions,
    loss_plot_png,
    redact,
    secret_env_values,
    start_parent_run,
)

REPO = Path(__file__).resolve().parents[2]
SECRET_KEYS = ["token", "hf_token", "HF_TOKEN", "access_token", "auth_token", "api_key", "apiKey", "API-KEY",
               "password", "MLFLOW_TRACKING_PASSWORD", "client_secret", "AWS_SECRET_ACCESS_KEY", "credentials",
               "private_key", "authorization"]
PLAIN_KEYS = ["tokenize", "tokenizer", "max_new_tokens", "trained_tokens", "tokens_per_s", "pad_token", "eos_token",
              "pad_token_id", "max_tokens", "key", "train_key", "revision", "name_or_path", "monkey", "author"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_keys_stay_visible(key):
    assert not is_secret_key(key)


def test_redact_config_like_dict():
    cfg = {
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B", "revision": "a1b2c3d4e5f6", "hub_token": "hf_abcdefghijklmnop"},
        "tokenize": {"max_length": 256, "template": "auto"},
        "eval": {"generation": {"max_new_tokens": 16}},
        "registry": {"tracking_uri": "https://alice:s3cr3t-pw@mlflow.example.com/", "password": None},
        "data": {"train": ["/data/a.jsonl", "https://bob:hunter22@host/b.jsonl"]},
        "storage": {"aws_secret_access_key": "AKIAXXXXXXXX", "auth": {"user": "x", "pass": "y"}},
    }
    out = redact(cfg, [])
    assert out["model"] == {"name_or_path": "Qwen/Qwen2.5-0.5B", "revision": "a1b2c3d4e5f6", "hub_token": REDACTED}
    assert out["tokenize"] == cfg["tokenize"] and out["eval"] == cfg["eval"]  # 'token' inside a word is no secret
    assert out["registry"] == {"tracking_uri": f"https://alice:{REDACTED}@mlflow.example.com/", "password": None}
    assert out["data"]["train"] == ["/data/a.jsonl", f"https://bob:{REDACTED}@host/b.jsonl"]
    assert out["storage"] == {"aws_secret_access_key": REDACTED, "auth": REDACTED}
    assert cfg["model"]["hub_token"] == "hf_abcdefghijklmnop"  # the input is not modified


def test_redact_env_secret_values_anywhere(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_canary0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-canary-42")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to replace safely inside other text
    assert set(secret_env_values()) >= {"hf_canary0123456789", "pw-canary-42"} and "abc" not in secret_env_values()
    out = redact({"data": {"train": ["hf://datasets/x?token=hf_canary0123456789"]}, "note": "pw-canary-42", "n": 3})
    assert out == {"data": {"train": [f"hf://datasets/x?token={REDACTED}"]}, "note": REDACTED, "n": 3}


def test_parent_run_params_are_redacted_and_tagged(mlflow_sqlite, monkeypatch):
    import mlflow

    from ftflow.config import load_config
    from infra.local import ensure_experiment

    monkeypatch.setenv("HF_TOKEN", "hf_canary0123456789")
    sets = ["data.system_prompt=use hf_canary0123456789 please", "model.hub_token=hf_configCANARY987654"]
    model = load_config(str(REPO / "configs/demo.yaml"), sets)
    cfg = model.model_dump(mode="json")
    tags = {"ftflow.base_model": "embedded:tiny-qwen2", "ftflow.prefect_ui": "https://u:hf_canary0123456789@prefect/runs/1"}
    rid = start_parent_run(ensure_experiment("t"), "p", cfg, tags=tags)
    run = mlflow.MlflowClient().get_run(rid)
    params, tags = run.data.params, run.data.tags
    assert set(params) == set(flatten(cfg))  # the whole resolved config
    assert params["tokenize.max_length"] == "256" and params["eval.generation.max_new_tokens"] == "16"
    assert params["data.system_prompt"] == f"use {REDACTED} please"
    assert params["model.hub_token"] == REDACTED
    assert redact(model.model_dump())["model"]["hub_token"] == REDACTED  # also when not dumped as JSON
    assert not any("canary" in v.lower() for v in [*params.values(), *tags.values()])
    assert tags["ftflow.prefect_ui"] == f"https://u:{REDACTED}@prefect/runs/1"
    assert tags["ftflow.git_commit"] == git_commit() and tags["ftflow.base_model"] == "embedded:tiny-qwen2"
    for lib in ("torch", "transformers", "peft", "deepspeed", "prefect", "mlflow"):
        assert tags[f"ftflow.version.{lib}"] == library_versions()[lib]
    assert run.info.status == "RUNNING"  # the flow ends it


def test_git_commit_format():
    commit = git_commit()
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40


def test_loss_plot_png():
    png = loss_plot_png([{"step": 1, "loss": 2.0, "learning_rate": 1e-3}, {"step": 2, "loss": 1.5, "learning_rate": 5e-4}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
