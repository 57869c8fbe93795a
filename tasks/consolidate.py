"""Turn the final training state into one Hugging Face model folder.

- ZeRO-2/3: DeepSpeed's own `zero_to_fp32` gathers the fp32 master weights from every rank's
  shard files (no hand-written `maybe_zero_3` gathering) and writes safetensors shards.
- No DeepSpeed: the Trainer already saved a Hugging Face folder; its weights are taken as they are.
- LoRA / Q-LoRA: the trained adapter is written as a PEFT adapter folder (every tensor at its full
  shape) for the un-quantised base, and, when `merge=True`, merged into the base as a full model.

The folder also carries the tokenizer with the chat template used in training and a generation
config whose eos ids include the end-of-turn token and whose pad id is the pad token. It is built
in a temporary folder and renamed when complete, so a partial export is never used.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ftflow.utils import atomic_dir
from tasks.train_worker import COMPLETE_MARKER

log = logging.getLogger("ftflow.consolidate")


class ConsolidationError(RuntimeError):
    pass


def _zero_state_dict(final_dir: Path, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(final_dir), tag="final", exclude_frozen_parameters=exclude_frozen)


def _hf_state_dict(final_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(final_dir.glob("*.safetensors"))
    files = [f for f in files if f.name != "reference_logits.safetensors"]
    if not files:
        raise ConsolidationError(f"{final_dir} holds no model weights (*.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def trained_state_dict(final_dir: Path, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    if (final_dir / "latest").is_file():
        return _zero_state_dict(final_dir, exclude_frozen)
    return _hf_state_dict(final_dir)


def _save_tokenizer_and_generation(base_path: str, out: Path, chat_template: str | None, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(base_path)
    except OSError:
        gen = GenerationConfig()
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id] if gen.eos_token_id is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    gen.eos_token_id = eos
    if tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(out)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def export_full(final_dir: Path, base_path: str, out: Path, *, trust_remote_code: bool = False) -> None:
    """Full fine-tuning: trained weights into the base architecture, saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = trained_state_dict(final_dir)
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    expected = set(model.state_dict().keys())
    missing = expected - set(state)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if missing - tied:
        raise ConsolidationError(f"the trained state lacks {len(missing - tied)} tensors, e.g. {sorted(missing - tied)[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")


def export_lora(final_dir: Path, base_path: str, out: Path, *, merge: bool, trust_remote_code: bool = False) -> None:
    """LoRA / Q-LoRA: the adapter (full-shape tensors) for the un-quantised base; optionally merged."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter_cfg_dir = final_dir if (final_dir / "adapter_config.json").is_file() else final_dir.parent / "adapter_config"
    peft_cfg = PeftConfig.from_pretrained(str(adapter_cfg_dir))
    state = trained_state_dict(final_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = PeftModel(base, peft_cfg)
    # Names as the engine saw them ("base_model.model....lora_A.weight" or with ".default").
    adapter_state = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k or "lora_magnitude" in k}
    if not adapter_state:
        raise ConsolidationError(f"no LoRA tensors found in {final_dir}")
    result = set_peft_model_state_dict(model, _normalise_adapter_keys(adapter_state))
    if result.unexpected_keys:
        raise ConsolidationError(f"adapter tensors did not match the model: {result.unexpected_keys[:3]}")
    adapter_dir = out / "adapter"
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    assert get_peft_model_state_dict(model)  # full-shape tensors were written
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    else:
        base.config.save_pretrained(out)


def _normalise_adapter_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`set_peft_model_state_dict` wants keys without the adapter name ('.default')."""
    return {k.replace(".default.", ".").replace(".default", ""): v for k, v in state.items()}


def consolidate(
    final_dir: str | Path,
    base_model_path: str,
    out_dir: str | Path,
    *,
    mode: str = "full",
    chat_template: str | None = None,
    merge: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write the Hugging Face folder for the training in `final_dir` to `out_dir` (atomically)."""
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    if not (final_dir / COMPLETE_MARKER).is_file():
        raise ConsolidationError(f"{final_dir} is not a complete training output (no {COMPLETE_MARKER}); re-run training")
    if (out_dir / "ftflow_export.json").is_file():
        log.info("export %s already complete: reusing it", out_dir)
        return out_dir
    with atomic_dir(out_dir) as tmp:
        if mode == "full":
            export_full(final_dir, base_model_path, tmp, trust_remote_code=trust_remote_code)
        else:
            export_lora(final_dir, base_model_path, tmp, merge=merge, trust_remote_code=trust_remote_code)
        _save_tokenizer_and_generation(base_model_path, tmp, chat_template, trust_remote_code)
        for extra in ("train_summary.json",):
            if (final_dir / extra).is_file():
                shutil.copy2(final_dir / extra, tmp / extra)
        (tmp / "ftflow_export.json").write_text(json.dumps({"mode": mode, "merged": merge, "source": str(final_dir)}))
    log.info("exported %s model to %s", mode, out_dir)
    return out_dir


def verify_export(out_dir: str | Path, final_dir: str | Path, reference_inputs: list[list[int]] | None,
                  atol: float = 1e-4, max_bytes: int = 2 << 30) -> float | None:
    """Compare the exported model's logits with those the ranks computed at the end of training.

    Skipped (None) when there is no reference or the model is larger than `max_bytes` (loading a
    7B model a second time just to check it is the consolidate test's job, not every run's).
    Raises ConsolidationError when the export does not reproduce the trained model.
    """
    ref_file = Path(final_dir) / "reference_logits.safetensors"
    out_dir = Path(out_dir)
    weights = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    if not reference_inputs or not ref_file.is_file() or weights == 0 or weights > max_bytes:
        return None
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = load_file(str(ref_file))["logits"]
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = torch.cat([model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in reference_inputs])
    diff = (got - ref).abs().max().item()
    if diff > atol:
        raise ConsolidationError(
            f"exported model {out_dir} does not reproduce the trained model: max |logit diff| {diff:.3e} > {atol:g}"
        )
    return diff
