"""Every training mode through the real launcher on the embedded tiny Qwen2, on CPU.

Each test trains a few steps (torchrun ranks, DeepSpeed over gloo), consolidates, reloads the
export and compares its logits on fixed inputs with the reference the ranks computed from the model
they trained (`final/reference_logits.safetensors`), never with the export itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftflow.config import TrainConfig
from tasks.consolidate import consolidate, materialise, trained_state_dict, write_sharded_safetensors
from tasks.tokenize import tokenize_dataset
from tasks.train import run_training

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
ATOL = 1e-5  # fp32 throughout; measured differences are ~5e-7 (reduction order in the matmuls)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes-data")
    rows = (REPO / "data/demo/reverse_train.jsonl").read_text().splitlines()[:64]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    tok = tokenize_dataset(root / "train.jsonl", str(tiny_model_dir), cache_root=root / "cache", max_length=64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    refs = [tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the words: apple river stone"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False),
            tokenizer("hello world")["input_ids"]]
    return str(tiny_model_dir), str(tok.path), tokenizer.pad_token_id, refs


def train(setup, tmp_path, **settings) -> dict:
    model, data, pad, refs = setup
    base = dict(max_steps=3, micro_batch_size=4, learning_rate=1e-3, save_steps=100, logging_steps=1, seed=5,
                timeout_minutes=5)
    return run_training(train=TrainConfig(**{**base, **settings}), train_dir=tmp_path / "train", model_path=model,
                        dataset_path=data, pad_token_id=pad, reference_inputs=refs)


@torch.no_grad()
def logits(model, refs) -> torch.Tensor:
    model.eval()
    return torch.cat([model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float() for ids in refs])


def reference(final_dir, name="reference_logits.safetensors") -> torch.Tensor:
    return load_file(str(Path(final_dir) / name))["logits"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_full_finetuning_two_ranks_reloads_exactly(zero, setup, tmp_path):
    model_dir, _, _, refs = setup
    s = train(setup, tmp_path, mode="full", deepspeed=f"configs/deepspeed/{zero}.json", nproc_per_node=2)
    assert s["world_size"] == 2 and s["deepspeed_stage"] == int(zero[-1]) and s["global_step"] == 3
    out = consolidate(s["final_dir"], model_dir, tmp_path / "export", mode="full")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(model, refs), reference(s["final_dir"]), rtol=0, atol=ATOL)
    generated = model.generate(torch.tensor([refs[0]]), max_new_tokens=3, do_sample=False)
    assert len(refs[0]) < generated.shape[1] <= len(refs[0]) + 3

    # Memory-bounded writing (lazy ZeRO gathering, one shard at a time) equals DeepSpeed's eager gathering.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    eager = get_fp32_state_dict_from_zero_checkpoint(s["final_dir"], tag="final")
    small = tmp_path / "sharded"
    small.mkdir()
    write_sharded_safetensors(trained_state_dict(Path(s["final_dir"])), small, max_shard_bytes=64 << 10)
    index = json.loads((small / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    written = {}
    for f in sorted(small.glob("model-*.safetensors")):
        written.update(load_file(str(f)))
    assert written.keys() == eager.keys()
    for k in eager:
        assert torch.equal(written[k], eager[k]), k
    exported = load_file(str(out / "model.safetensors"))
    for k in exported:
        assert torch.equal(exported[k], eager[k]), k


def test_bf16_zero3_export_is_verified_in_the_training_precision(setup, tmp_path):
    """bf16 ranks keep fp32 master weights; the export (fp32 masters) reloaded in bf16 must give the
    ranks' logits to bf16 rounding, and a wrong export must still fail the check."""
    from tasks.consolidate import ConsolidationError, verify_export

    model_dir, _, _, refs = setup
    s = train(setup, tmp_path, mode="full", deepspeed="configs/deepspeed/zero3.json", nproc_per_node=2, precision="bf16")
    assert s["precision"] == "bf16" and s["world_size"] == 2
    out = consolidate(s["final_dir"], model_dir, tmp_path / "export", mode="full")
    exported = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.float32}  # the masters, not the bf16 working copy
    ref = reference(s["final_dir"])
    tolerance = 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    diff = verify_export(out, s["final_dir"], refs)
    assert diff is not None and diff <= tolerance
    # Compared in fp32 the same export misses the fp32 tolerance (the bf16 gap): why the check uses
    # the training precision (before, every bf16 run failed here).
    fp32 = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), refs)
    assert (fp32 - ref).abs().max().item() > 1e-4

    # The untrained base in place of the export is caught.
    wrong = tmp_path / "wrong"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(wrong)
    with pytest.raises(ConsolidationError, match="compared in bfloat16"):
        verify_export(wrong, s["final_dir"], refs)


def test_bf16_without_deepspeed_trains_fp32_weights_under_autocast(setup, tmp_path):
    """No DeepSpeed, so no master weights: the weights stay fp32 (compute in bf16 autocast) and the
    export is checked in fp32 to 1e-5."""
    from tasks.consolidate import verify_export

    model_dir, _, _, refs = setup
    s = train(setup, tmp_path, mode="full", deepspeed=None, nproc_per_node=1, precision="bf16")
    assert s["precision"] == "bf16" and s["deepspeed_stage"] is None
    out = consolidate(s["final_dir"], model_dir, tmp_path / "export", mode="full")
    exported = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    base = load_file(str(Path(model_dir) / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(exported[key], base[key].float())  # trained
    diff = verify_export(out, s["final_dir"], refs, atol=ATOL)
    assert diff is not None and diff <= ATOL


def test_chunked_loss_under_zero3_gives_the_same_losses(setup, tmp_path):
    """ZeRO-3 gathers the (tied, partitioned) head once per chunk: same losses as the model's loss."""
    runs = {}
    for chunk in (0, 8):
        s = train(setup, tmp_path / f"chunk{chunk}", mode="full", deepspeed="configs/deepspeed/zero3.json",
                  nproc_per_node=2, loss_chunk_tokens=chunk)
        assert s["loss"] == (f"chunked:{chunk}" if chunk else "model")
        runs[chunk] = [h["loss"] for h in s["log_history"] if "loss" in h]
    assert len(runs[0]) == 3
    torch.testing.assert_close(runs[8], runs[0], rtol=1e-5, atol=1e-6)


def test_lora_zero3_two_ranks_exports_complete_adapter_and_merged_model(setup, tmp_path, mlflow_sqlite):
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, LoraConfig

    model_dir, _, _, refs = setup
    s = train(setup, tmp_path, mode="lora", deepspeed="configs/deepspeed/zero3.json", nproc_per_node=2,
              lora={"r": 4, "alpha": 8, "dropout": 0.0, "merge": True})
    ref = reference(s["final_dir"])
    out = consolidate(s["final_dir"], model_dir, tmp_path / "export", mode="lora", merge=True)

    # merged full model at the root
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, refs), ref, rtol=0, atol=ATOL)

    # the adapter: every tensor at full shape, config naming the base; base + adapter through peft
    adapter_dir = out / "adapter"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == model_dir and cfg["r"] == 4
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == want and all(v.numel() > 0 for v in saved.values())
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, adapter_dir), refs), ref, rtol=0, atol=ATOL)

    # without merge the export root is the adapter, still loadable by from_pretrained (peft integration)
    plain = consolidate(s["final_dir"], model_dir, tmp_path / "export-adapter", mode="lora", merge=False)
    assert (plain / "adapter_config.json").is_file() and (plain / "tokenizer_config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded, refs), ref, rtol=0, atol=ATOL)

    # registered as an adapter version of the embedded base, then loaded by alias: still the trained model
    import mlflow

    from infra.local import ensure_experiment
    from tasks.evaluate import load_for_inference
    from tasks.registry import register_model

    run_id = mlflow.MlflowClient().create_run(ensure_experiment("t")).info.run_id
    register_model(plain, model_name="lora", run_id=run_id, fingerprint="f", tags={}, base_model="embedded:tiny-qwen2")
    served, _, _ = load_for_inference("models:/lora@challenger")
    torch.testing.assert_close(logits(served, refs), ref, rtol=0, atol=ATOL)


def test_qlora_one_rank_exports_adapter_for_the_unquantised_base(setup, tmp_path):
    """Q-LoRA trains against the nf4-quantised base, but the export is the adapter for the original
    (un-quantised) base. So the reference the rank writes is that base, loaded in fp32 from disk, with
    the adapter tensors as they are in the rank's memory after training; the 4-bit model's own logits
    are kept in `reference_logits_quantized.safetensors`. The adapter must reproduce the reference to
    1e-5 (fp32), and on the base re-quantised as in training it reproduces the 4-bit model to 1e-5.
    Between the two references lies the quantisation error of the base: checked only to be non-zero
    and bounded, not exact."""
    from peft import PeftModel

    model_dir, _, _, refs = setup
    s = train(setup, tmp_path, mode="qlora", deepspeed=None, nproc_per_node=1,
              quant={"compute_dtype": "float32"}, lora={"r": 4, "alpha": 8, "dropout": 0.0, "merge": True},
              gradient_checkpointing=True)
    assert s["mode"] == "qlora" and s["deepspeed_stage"] is None and s["gradient_checkpointing"] is True
    ref, ref_q = reference(s["final_dir"]), reference(s["final_dir"], "reference_logits_quantized.safetensors")
    out = consolidate(s["final_dir"], model_dir, tmp_path / "export", mode="qlora", merge=True)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged, refs), ref, rtol=0, atol=ATOL)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, out / "adapter"), refs), ref, rtol=0, atol=ATOL)
    # the same adapter on the base re-quantised exactly as in training reproduces the 4-bit model too
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base_4bit = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=q)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base_4bit, out / "adapter"), refs), ref_q,
                               rtol=0, atol=ATOL)
    # measured on the tiny model: max |Δ| ~0.13 for logits up to ~1.5 (nf4 error of a random-init base)
    gap = (ref - ref_q).abs().max().item()
    assert 1e-4 < gap < 0.5 * ref.abs().max().item(), f"quantised vs un-quantised logits differ by {gap}"
