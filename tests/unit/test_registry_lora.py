"""Registry stage for LoRA runs: an adapter version holds the adapter and references its base portably;
a merged version holds the merged model and keeps the adapter beside it. Both are served by alias.

The exports come from the real consolidate stage, fed a LoRA "training output" written directly
(a PEFT adapter with large random weights on the embedded tiny Qwen2), so no DeepSpeed run is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.registry import base_model_ref, register_model

CHAT = [{"role": "user", "content": "Reverse the words: apple river stone"}]
GEN = {"max_new_tokens": 6}
BASE_ID = "embedded:tiny-qwen2"


@pytest.fixture(scope="module")
def lora_exports(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """{"adapter": merge=False export, "merged": merge=True export} of one random LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.consolidate import consolidate
    from tasks.train_worker import COMPLETE_MARKER

    root = tmp_path_factory.mktemp("lora-export")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():  # large enough that base + adapter replies differ from the base's
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    final = root / "final"
    model.save_pretrained(final)  # what a training without DeepSpeed leaves in final/
    (final / COMPLETE_MARKER).write_text("{}")
    return {kind: consolidate(final, str(tiny_model_dir), root / kind, mode="lora", merge=kind == "merged")
            for kind in ("adapter", "merged")}


def _run() -> str:
    import mlflow

    from infra.local import ensure_experiment

    return mlflow.MlflowClient().create_run(ensure_experiment("t")).info.run_id


def _versions(name: str) -> list[str]:
    import mlflow

    return sorted(str(mv.version) for mv in mlflow.MlflowClient().search_model_versions(f"name = '{name}'"))


def _base_plus_adapter(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     adapter_dir).eval()


def _pyfunc_reply(uri: str) -> str:
    import mlflow

    out = mlflow.pyfunc.load_model(uri).predict({"messages": CHAT, "max_tokens": GEN["max_new_tokens"]})
    message = out[0]["choices"][0]["message"]
    assert message["role"] == "assistant"
    return message["content"]


def test_adapter_version_holds_the_adapter_and_a_portable_base(mlflow_sqlite, lora_exports, tiny_model_dir, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.evaluate import generate_batch, load_for_inference

    rid = _run()
    first = register_model(lora_exports["adapter"], model_name="lora", run_id=rid, fingerprint="fa", tags={},
                           base_model=BASE_ID)
    again = register_model(lora_exports["adapter"], model_name="lora", run_id=rid, fingerprint="fa", tags={},
                           base_model=BASE_ID)
    assert (first.existed, again.existed, first.version, again.version) == (False, True, "1", "1")
    assert _versions("lora") == ["1"]

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("lora", "challenger")
    assert {k: mv.tags.get(k) for k in ("ftflow.export", "ftflow.base_model", "ftflow.base_model_revision")} == {
        "ftflow.export": "adapter", "ftflow.base_model": BASE_ID, "ftflow.base_model_revision": "none"}
    meta = mlflow.models.get_model_info("models:/lora@challenger").metadata
    assert (meta["ftflow.export"], meta["ftflow.base_model"]) == ("adapter", BASE_ID)

    # the stored artifact is the adapter + tokenizer: no model weights, a fraction of the base's size
    files = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/lora/1", dst_path=str(tmp_path / "dl")))
    names = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    assert "peft/adapter_model.safetensors" in names and "peft/adapter_config.json" in names
    assert not [n for n in names if n.endswith(("model.safetensors", ".bin")) and "adapter" not in n], names
    stored = sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    base_weights = (tiny_model_dir / "model.safetensors").stat().st_size
    assert stored < base_weights / 4, (stored, base_weights)
    adapter_cfg = json.loads((files / "peft/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == BASE_ID  # portable, not this machine's folder
    tok = AutoTokenizer.from_pretrained(files / "components/tokenizer")
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(CHAT, tokenize=False)

    # served by alias: ftflow's loader and pyfunc both equal base + adapter loaded directly (greedy)
    model, tok, local = load_for_inference("models:/lora@challenger")
    got = generate_batch(model, tok, [CHAT], GEN, 1)
    want = generate_batch(_base_plus_adapter(tiny_model_dir, lora_exports["adapter"]), tok, [CHAT], GEN, 1)
    base_only = generate_batch(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok, [CHAT], GEN, 1)
    assert got == want and got != base_only  # the adapter is applied, and it changes the reply
    folder_model, folder_tok, _ = load_for_inference(str(lora_exports["adapter"]))  # the export folder itself
    assert generate_batch(folder_model, folder_tok, [CHAT], GEN, 1) == want
    assert Path(local).name == "peft"
    assert _pyfunc_reply("models:/lora@challenger") == got[0]["prediction"]


def test_merged_version_is_the_full_model_with_the_adapter_beside_it(mlflow_sqlite, lora_exports, tmp_path):
    import mlflow

    from tasks.evaluate import generate_batch, load_for_inference

    rid = _run()
    first = register_model(lora_exports["merged"], model_name="lora", run_id=rid, fingerprint="fm", tags={"x": "1"},
                           base_model=BASE_ID)
    again = register_model(lora_exports["merged"], model_name="lora", run_id=rid, fingerprint="fm", tags={"x": "1"},
                           base_model=BASE_ID)
    assert (first.existed, again.existed, first.version, again.version) == (False, True, "1", "1")
    assert _versions("lora") == ["1"]

    client = mlflow.MlflowClient()
    tags = client.get_model_version("lora", "1").tags
    assert (tags["ftflow.export"], tags["ftflow.base_model"], tags["x"]) == ("merged", BASE_ID, "1")
    assert tags["ftflow.adapter_uri"] == f"runs:/{rid}/adapter"
    assert mlflow.models.get_model_info("models:/lora/1").metadata["ftflow.export"] == "merged"

    files = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/lora/1", dst_path=str(tmp_path / "dl")))
    assert (files / "model/model.safetensors").is_file() and not (files / "peft").exists()
    adapter = Path(mlflow.artifacts.download_artifacts(artifact_uri=tags["ftflow.adapter_uri"],
                                                       dst_path=str(tmp_path / "adapter")))
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID

    # the merged model by alias, through pyfunc and ftflow's loader, equals the export folder itself
    model, tok, _ = load_for_inference("models:/lora@challenger")
    got = generate_batch(model, tok, [CHAT], GEN, 1)
    ref_model, ref_tok, _ = load_for_inference(str(lora_exports["merged"]))
    assert got == generate_batch(ref_model, ref_tok, [CHAT], GEN, 1)
    assert not hasattr(model, "peft_config")
    assert _pyfunc_reply("models:/lora@challenger") == got[0]["prediction"]


def test_adapter_without_its_base_here_is_refused_before_logging(mlflow_sqlite, lora_exports):
    with pytest.raises(FileNotFoundError, match="not-cached/base-model"):
        register_model(lora_exports["adapter"], model_name="lora", run_id=_run(), fingerprint="fx", tags={},
                       base_model="not-cached/base-model")
    assert _versions("lora") == []


def test_base_model_ref(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants

    ref = base_model_ref(BASE_ID)
    assert (ref.name, ref.revision, Path(ref.local_dir)) == (BASE_ID, None, tiny_model_dir)
    ref = base_model_ref(str(tiny_model_dir))
    assert (ref.name, ref.revision, ref.local_dir) == (str(tiny_model_dir), None, str(tiny_model_dir))

    # a hub id: the snapshot in the local cache, recorded by its commit (a branch name is resolved)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = base_model_ref("org/tiny", "main")
    assert (ref.name, ref.revision, ref.local_dir) == ("org/tiny", commit, str(repo / "snapshots" / commit))
    ref = base_model_ref("org/absent", "v1")
    assert (ref.name, ref.revision, ref.local_dir) == ("org/absent", "v1", None)
