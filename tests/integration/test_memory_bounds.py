"""Exports that scale: the LoRA merge streams the base shard by shard in the training dtype, and
consolidate / merge / register each stay within a memory bound derived from the shard size.

The merged weights are checked against peft's own `merge_and_unload` on the whole fp32 model (an
independent reference), never against the export itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tasks.consolidate import consolidate
from tasks.train_worker import COMPLETE_MARKER

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture(scope="module")
def sharded_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2 re-saved as several safetensors shards (an index file, like real checkpoints)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded-base")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(out, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def _lora_run(base: Path, root: Path, precision: str, **lora):
    """A trained-looking adapter (random LoRA and modules_to_save tensors) saved as a run's final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM", **lora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                p.normal_(0.0, 0.5)
    final = root / "final"
    model.save_pretrained(final)
    (final / "train_summary.json").write_text(json.dumps({"precision": precision, "mode": "lora"}))
    (final / COMPLETE_MARKER).write_text("{}")
    return model, final


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("precision, requested, want", [
    ("fp32", "auto", torch.float32),
    ("bf16", "auto", torch.bfloat16),      # bf16 runs export bf16
    ("bf16", "float32", torch.float32),    # unless export.dtype says otherwise
])
def test_streamed_merge_equals_peft_merge_and_unload(sharded_base, tmp_path, precision, requested, want):
    from peft import get_peft_model_state_dict

    model, final = _lora_run(sharded_base, tmp_path, precision, use_rslora=True, modules_to_save=["model.norm"])
    out = consolidate(final, str(sharded_base), tmp_path / "export", mode="lora", merge=True, dtype=requested,
                      max_shard_bytes=100_000)
    adapter = get_peft_model_state_dict(model)
    reference = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}

    got = _saved_tensors(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    assert set(got) == set(reference) - {"lm_head.weight"} or set(got) == set(reference)
    for k, v in got.items():
        assert v.dtype == want, k
        # fp32: the same sum; bf16: the fp32 sum rounded once (relative error <= 2^-9)
        tol = dict(rtol=0, atol=1e-6) if want == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
        torch.testing.assert_close(v.float(), reference[k].float(), **tol, msg=k)
    assert any((got[k].float() - _saved_tensors(sharded_base)[k]).abs().max() > 1e-3 for k in got if "q_proj" in k)
    # the adapter beside it is the trained one, tensor for tensor
    saved = _saved_tensors(out / "adapter")
    assert set(saved) == set(adapter)
    for k in adapter:
        torch.testing.assert_close(saved[k], adapter[k], rtol=0, atol=0)


def test_dora_falls_back_to_peft_merge_and_still_matches(sharded_base, tmp_path, caplog):
    model, final = _lora_run(sharded_base, tmp_path, "fp32", use_dora=True)
    with caplog.at_level(logging.WARNING, logger="ftflow.consolidate"):
        out = consolidate(final, str(sharded_base), tmp_path / "export", mode="lora", merge=True)
    assert "DoRA" in caplog.text
    reference = model.merge_and_unload().state_dict()
    for k, v in _saved_tensors(out).items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def memory_figures(tmp_path_factory) -> dict:
    """Peak RSS of consolidate, merge and register on a ~170M-parameter model (bench.bench_memory)."""
    from bench.bench_memory import run

    return run(tmp_path_factory.mktemp("memory"), shard_bytes=32 * MIB)


def test_consolidate_merge_and_register_stay_within_a_few_shards(memory_figures):
    """The bound: 3 output shards (the shard, its copy handed to safetensors, the file's buffer) plus
    4 of the largest tensor in fp32 (the base tensor read, its fp32 copy, the delta, the sum) plus
    64 MiB for allocator slack. The fp32 model is 4x larger than that bound, so loading it whole -- what
    the merge and registration did before -- cannot pass."""
    m = memory_figures["model"]
    shard = memory_figures["shard_bytes"]
    bound = 3 * shard + 4 * m["largest_tensor_fp32_bytes"] + 64 * MIB
    assert m["parameters"] > 100e6 and m["fp32_bytes"] > 2 * bound
    for step in ("consolidate", "merge", "register"):
        delta = memory_figures[step]["delta"]
        assert delta < bound, f"{step}: peak RSS grew {delta / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB"
