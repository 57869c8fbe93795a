"""Turn the final training state into one Hugging Face model folder.

- ZeRO-2/3: DeepSpeed's own `zero_to_fp32` gathers the fp32 master weights from every rank's
  shard files (no hand-written `maybe_zero_3` gathering). It runs in lazy mode: the rank files are
  memory-mapped and each parameter is gathered only when its safetensors shard is written, so peak
  memory is one output shard beyond the mapped files, not a second full copy of the model.
- No DeepSpeed: the Trainer already saved a Hugging Face (or PEFT adapter) folder; taken as it is.
- LoRA / Q-LoRA: the trained adapter is written as a PEFT adapter folder (every tensor at its full
  shape, `adapter_config.json` naming the base by path) for the un-quantised base.
  merge=False: the adapter folder IS the export root; `AutoModelForCausalLM.from_pretrained(export)`
  loads base + adapter through transformers' peft integration (the base path must still exist).
  merge=True: the merged full model at the root, in the training dtype (`export.dtype` overrides),
  written shard by shard from the base's safetensors (`merge_lora_streaming`), the adapter in `adapter/`.
  Neither loads the base whole: peak memory is the adapter plus about one output shard.

The folder also carries the tokenizer with the chat template used in training and a generation
config whose eos ids include the end-of-turn token and whose pad id is the pad token. It is built
in a temporary folder and renamed when complete, so a partial export is never used.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ftflow.utils import atomic_dir
from tasks.train_worker import COMPLETE_MARKER

log = logging.getLogger("ftflow.consolidate")


class ConsolidationError(RuntimeError):
    pass


def _zero_state_dict(final_dir: Path, exclude_frozen: bool = False) -> dict[str, Any]:
    """Name -> lazy tensor: DeepSpeed's `zero_to_fp32` in lazy mode maps the rank shards and gathers
    one parameter only when `.contiguous()` is called on it (plain tensors for frozen parameters)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        str(final_dir), tag="final", exclude_frozen_parameters=exclude_frozen, lazy_mode=True
    )


def _hf_state_dict(final_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(final_dir.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("reference_logits")]
    if not files:
        raise ConsolidationError(f"{final_dir} holds no model weights (*.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def trained_state_dict(final_dir: Path, exclude_frozen: bool = False) -> dict[str, Any]:
    """The trained weights by name; values are tensors or lazy ZeRO tensors (call `.contiguous()`)."""
    if (final_dir / "latest").is_file():
        return _zero_state_dict(final_dir, exclude_frozen)
    return _hf_state_dict(final_dir)


def materialise(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}


def write_sharded_safetensors(state: dict[str, Any], out: Path, max_shard_bytes: int = 2 << 30) -> None:
    """Write `state` as HF safetensors shards, gathering one shard at a time.

    Peak memory is one shard (at most `max_shard_bytes`, or one tensor if it is bigger) beyond what
    the lazy state holds (memory-mapped rank files), never a second full copy of the model.
    """
    from safetensors.torch import save_file

    def nbytes(v) -> int:
        return math.prod(v.shape) * v.dtype.itemsize

    groups: list[list[str]] = [[]]
    size = 0
    for k, v in state.items():
        if groups[-1] and size + nbytes(v) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes(v)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, groups):
        shard = {k: state[k].contiguous().clone() for k in keys}  # clone: shared storage would refuse to save
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    if len(groups) > 1:
        total = sum(nbytes(v) for v in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


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


def export_full(final_dir: Path, base_path: str, out: Path, *, trust_remote_code: bool = False,
                max_shard_bytes: int = 2 << 30) -> None:
    """Full fine-tuning: the trained fp32 weights under the base architecture's names, as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = trained_state_dict(final_dir)
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # names and shapes only, no memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    expected = model.state_dict()
    tied_keys = getattr(model, "_tied_weights_keys", None) or {}  # {"lm_head.weight": "model.embed_tokens.weight"}
    tied = set(tied_keys) if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(expected) - set(state) - tied
    if missing:
        raise ConsolidationError(f"the trained state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ConsolidationError(f"trained tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                                 f"the base expects {tuple(expected[bad[0]].shape)}")
    # Tied copies (lm_head = embed_tokens) are written once, as save_pretrained does.
    keep = {k: state[k] for k in expected if k in state and k not in tied}
    config.dtype = torch.float32
    config.save_pretrained(out)
    write_sharded_safetensors(keep, out, max_shard_bytes)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_dtype(final_dir: Path, requested: str = "auto") -> torch.dtype:
    """The dtype of a merged export: `requested` (`export.dtype`), or with `auto` the training's
    precision as `train_summary.json` records it (bf16 runs export bf16; fp32 when unrecorded)."""
    if requested != "auto":
        return DTYPES[requested]
    summary = final_dir / "train_summary.json"
    precision = json.loads(summary.read_text()).get("precision", "fp32") if summary.is_file() else "fp32"
    return _PRECISION_DTYPE.get(precision, torch.float32)


def _saved_names(name: str) -> tuple[str, ...]:
    """The names peft's adapter file gives the module parameter `name` (adapter name dropped)."""
    plain = name.replace(".modules_to_save.default.", ".").replace(".default", "")
    return (plain, plain.removesuffix(".weight")) if "lora_magnitude_vector" in name else (plain,)


def _adapter_model(final_dir: Path, base_path: str, trust_remote_code: bool):
    """The trained adapter in a PeftModel whose base is on the meta device (names and shapes, no
    memory): the LoRA tensors are real, the base weights are never loaded."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (final_dir / "adapter_config.json").is_file():
        raise ConsolidationError(f"{final_dir} has no adapter_config.json; it was not trained with train.mode=lora/qlora")
    peft_cfg = PeftConfig.from_pretrained(str(final_dir))
    peft_cfg.base_model_name_or_path = str(base_path)
    # Only the trained tensors: the adapter file a run without DeepSpeed saved, or the ZeRO state
    # without its frozen parameters (LoRA and modules_to_save copies, under the module's own names).
    state = materialise(trained_state_dict(final_dir, exclude_frozen=True))
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
        model = PeftModel(base, peft_cfg)
    # Each adapter parameter of the model, found under its module name (ZeRO state) or the name
    # peft's adapter file gives it (adapter name and `modules_to_save.` dropped), then assigned.
    values, missing = {}, []
    for name, p in model.named_parameters():
        if "lora_" not in name and ".modules_to_save." not in name:
            continue
        v = next((state[k] for k in (name, *_saved_names(name)) if k in state), None)
        if v is None:
            missing.append(name)
        elif tuple(v.shape) != tuple(p.shape):
            raise ConsolidationError(f"trained tensor {name} has shape {tuple(v.shape)}, the adapter expects {tuple(p.shape)}")
        else:
            values[name] = v
    if not values:
        raise ConsolidationError(f"no LoRA tensors found in {final_dir}")
    if missing:
        raise ConsolidationError(f"the trained adapter lacks {len(missing)} tensors, e.g. {missing[:3]}")
    used = set(values) | {k for n in values for k in _saved_names(n)}
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ConsolidationError(f"adapter tensors did not match the model: {unexpected[:3]}")
    model.load_state_dict(values, strict=False, assign=True)  # assign: real tensors replace the meta ones
    return model, config


def _base_files(base_path: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of the base model folder ({} when it has none)."""
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for f in sorted(Path(base_path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            files.update(dict.fromkeys(h.keys(), f))
    return files


_SAFETENSORS_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


class _MergedTensor:
    """One tensor of the merged model, read and merged only when its output shard is written
    (`write_sharded_safetensors` calls `.contiguous()`): base (or its trained `modules_to_save`
    copy) + scaling * B @ A, computed in fp32 and cast to the export dtype."""

    def __init__(self, file: Path, key: str, dtype: torch.dtype, lora=None, replacement=None):
        from safetensors import safe_open

        with safe_open(str(file), "pt") as h:
            sl = h.get_slice(key)
            self.shape = tuple(sl.get_shape())
            stored = sl.get_dtype()
        self.file, self.key, self.lora, self.replacement = file, key, lora, replacement
        self.cast = stored in ("F64", "F32", "BF16", "F16")  # integer buffers keep their dtype
        self.dtype = dtype if self.cast else _SAFETENSORS_DTYPES[stored]

    def contiguous(self) -> torch.Tensor:
        from safetensors import safe_open

        if self.replacement is not None:
            w = self.replacement.detach()
        else:
            with safe_open(str(self.file), "pt") as h:
                w = h.get_tensor(self.key)
        if self.lora is not None:  # (out, in) += scaling * (out, r) @ (r, in), transposed for Conv1D-style layers
            a, b, scaling, fan_in_fan_out = self.lora
            delta = (b.detach().float() @ a.detach().float()) * scaling
            w = w.float() + (delta.T if fan_in_fan_out else delta)
        return (w.to(self.dtype) if self.cast else w).contiguous()


def _streaming_plan(model, config, base_files: dict[str, Path], dtype: torch.dtype) -> dict[str, _MergedTensor] | str:
    """Output name -> lazy merged tensor, or the reason the adapter cannot be merged tensor by tensor."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not base_files:
        return "the base folder holds no *.safetensors"
    prefix = "base_model.model."
    lora: dict[str, tuple] = {}
    replace: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if isinstance(module, ModulesToSaveWrapper):
            for pname, p in module.modules_to_save["default"].named_parameters():
                replace[f"{short}.{pname}"] = p
        elif isinstance(module, LoraLayer):
            if type(module) is not LoraLinear:
                return f"{name} is a {type(module).__name__} LoRA layer (only nn.Linear layers merge tensor by tensor)"
            if module.use_dora.get("default"):
                return "DoRA (use_dora) adapters"
            lora[f"{short}.weight"] = (module.lora_A["default"].weight, module.lora_B["default"].weight,
                                       module.scaling["default"], module.fan_in_fan_out)
    missing = [k for k in [*lora, *replace] if k not in base_files]
    if missing:
        return f"{missing[0]} is not stored in the base folder (tied weights?)"
    if getattr(config, "tie_word_embeddings", False):
        tied = [k for k in [*lora, *replace] if k.startswith(("lm_head.", "model.embed_tokens."))]
        if tied:
            return f"{tied[0]} is tied to another weight"
    return {k: _MergedTensor(f, k, dtype, lora.get(k), replace.get(k)) for k, f in base_files.items()}


def merge_lora_streaming(model, config, base_path: str, out: Path, dtype: torch.dtype,
                         max_shard_bytes: int = 2 << 30) -> bool:
    """Write base + adapter merged, shard by shard, in `dtype`; False (nothing written) when the
    adapter needs peft's in-memory merge (`_streaming_plan` says why).

    Peak memory: the adapter, one output shard (`max_shard_bytes`) and one tensor in fp32 while it is
    merged; the base is read one tensor at a time from its safetensors files."""
    plan = _streaming_plan(model, config, _base_files(base_path), dtype)
    if isinstance(plan, str):
        log.warning("merging in memory (the whole base model is loaded): %s", plan)
        return False
    config.dtype = dtype
    config.save_pretrained(out)
    write_sharded_safetensors(plan, out, max_shard_bytes)
    return True


def export_lora(final_dir: Path, base_path: str, out: Path, *, merge: bool, trust_remote_code: bool = False,
                dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 << 30) -> None:
    """LoRA / Q-LoRA: the adapter (every tensor at full shape) for the un-quantised base.

    Layout: merge=False puts the adapter folder at the root of `out` (adapter_config.json names the
    base by path, so `AutoModelForCausalLM.from_pretrained(out)` loads base + adapter through peft);
    merge=True puts the merged full model (in `dtype`) at the root and the adapter in `out/adapter/`.
    The base is never loaded whole: the adapter is saved from a meta-device base, and the merge
    streams the base's safetensors tensor by tensor (`merge_lora_streaming`), except for the layer
    kinds it does not cover (DoRA, embedding/conv LoRA, tied targets), which peft merges in memory.
    """
    from transformers import AutoModelForCausalLM

    model, config = _adapter_model(final_dir, base_path, trust_remote_code)
    adapter_dir = out / "adapter" if merge else out
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    if merge and not merge_lora_streaming(model, config, base_path, out, dtype, max_shard_bytes):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(dtype)
        merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_bytes)


def consolidate(
    final_dir: str | Path,
    base_model_path: str,
    out_dir: str | Path,
    *,
    mode: str = "full",
    chat_template: str | None = None,
    merge: bool = False,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    max_shard_bytes: int = 2 << 30,
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
            export_full(final_dir, base_model_path, tmp, trust_remote_code=trust_remote_code, max_shard_bytes=max_shard_bytes)
        else:
            export_lora(final_dir, base_model_path, tmp, merge=merge, trust_remote_code=trust_remote_code,
                        dtype=export_dtype(final_dir, dtype), max_shard_bytes=max_shard_bytes)
        _save_tokenizer_and_generation(base_model_path, tmp, chat_template, trust_remote_code)
        for extra in ("train_summary.json",):
            if (final_dir / extra).is_file():
                shutil.copy2(final_dir / extra, tmp / extra)
        written = {"mode": mode, "merged": merge, "source": str(final_dir)}
        if merge and mode != "full":
            written["dtype"] = str(export_dtype(final_dir, dtype)).removeprefix("torch.")
        (tmp / "ftflow_export.json").write_text(json.dumps(written))
    log.info("exported %s model to %s", mode, out_dir)
    return out_dir


def verify_export(out_dir: str | Path, final_dir: str | Path, reference_inputs: list[list[int]] | None,
                  atol: float = 1e-4, max_bytes: int = 2 << 30) -> float | None:
    """Compare the exported model's logits with those the ranks computed at the end of training.

    The export holds the fp32 master weights. The ranks computed their reference with the weights
    they trained in (DeepSpeed bf16/fp16: half-precision working copies of those masters) and
    record that precision in the file, so the check runs in it: the export loaded in bf16 is the
    ranks' model up to rounding, and the tolerance is then 2 units of that precision at the
    largest logit (measured on the demo: 0.047 of a tolerance of 0.13, while fp32 against a bf16
    reference differs by 0.15). bf16/fp16 runs without DeepSpeed keep fp32 weights and compute under
    the Trainer's autocast: checked under the same autocast, with the same tolerance (on CPU the
    difference is ~1e-6). fp32 runs and Q-LoRA's unquantised base: fp32, within `atol`.

    Skipped (None) when there is no reference or the model is larger than `max_bytes` (loading a
    7B model a second time just to check it is the consolidate test's job, not every run's).
    Raises ConsolidationError when the export does not reproduce the trained model.
    """
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    ref_file = final_dir / "reference_logits.safetensors"
    weights = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    if (out_dir / "adapter_config.json").is_file():  # an adapter export loads its base too
        base = Path(json.loads((out_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
        weights += sum(f.stat().st_size for f in base.glob("*.safetensors")) if base.is_dir() else max_bytes + 1
    if not reference_inputs or not ref_file.is_file() or weights == 0 or weights > max_bytes:
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with safe_open(str(ref_file), "pt") as f:  # the ranks record the precision they computed it in
        meta = f.metadata() or {}
    halves = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    precision, autocast = meta.get("dtype", "float32"), meta.get("autocast", "")
    dtype = halves.get(precision, torch.float32)
    ref = load_file(str(ref_file))["logits"]
    half = dtype if dtype != torch.float32 else halves.get(autocast)
    if half is not None:  # half-precision compute (the ranks' may be CUDA kernels, this check's CPU ones)
        atol = 2 * torch.finfo(half).eps * max(1.0, ref.abs().max().item())
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=halves.get(autocast, torch.bfloat16), enabled=autocast in halves):
        got = torch.cat([model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float() for ids in reference_inputs])
    if autocast in halves:
        precision = f"{precision} under {autocast} autocast"
    diff = (got - ref).abs().max().item()
    if diff > atol:
        raise ConsolidationError(
            f"exported model {out_dir} does not reproduce the trained model: max |logit diff| {diff:.3e} > {atol:g} "
            f"(compared in {precision})"
        )
    return diff
