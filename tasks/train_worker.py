"""The training recipe that runs inside every rank.

Launched as its own process by `tasks.train.launch` (torchrun), one per rank:

    torchrun --nproc_per_node 2 -m tasks.train_worker RUN_DIR/train/job.json

It needs no Prefect run context: everything arrives in the job file (plain paths and the
validated train section of the pipeline config). Read it top to bottom: setup → train → save.

- The model is loaded after `TrainingArguments` exist, so ZeRO-3 partitions it at load time.
- Checkpoints are DeepSpeed/Trainer checkpoints; a checkpoint counts only once every rank has
  written it and rank 0 has dropped the `ftflow_complete.json` marker into it.
- At the end the engine writes a final ZeRO checkpoint (`final/`), which the consolidate stage
  turns into a Hugging Face folder with DeepSpeed's own gathering code. Reference logits on fixed
  inputs are taken here, inside the ranks, so tests compare the export against the trained model
  rather than against itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("ftflow.train")

COMPLETE_MARKER = "ftflow_complete.json"
IGNORE_INDEX = -100


@dataclass
class Job:
    model_path: str
    dataset_path: str
    output_dir: str
    pad_token_id: int
    train: dict[str, Any]
    deepspeed_config: dict[str, Any] | None = None
    resume_from: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    reference_inputs: list[list[int]] | None = None
    chat_template: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        return cls(**json.loads(Path(path).read_text()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def micro_batch_size(t: dict[str, Any]) -> int:
    """Items the data loader batches per rank: samples, or one bin of `tokens_per_batch` tokens."""
    return 1 if t.get("tokens_per_batch") else t["micro_batch_size"]


def fill_deepspeed_config(ds: dict[str, Any], t: dict[str, Any], world: int) -> dict[str, Any]:
    """Explicit batch sizes and precision: the Trainer's 'auto' mis-counts the world size on CPU.

    global batch = micro batch x grad accumulation x ranks, e.g. 8 x 1 x 2 = 16 samples a step
    (with tokens_per_batch, a micro batch is one bin: 1 x grad accumulation x ranks bins a step).
    """
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size(t)
    ds["gradient_accumulation_steps"] = t["grad_accum"]
    ds["train_batch_size"] = micro_batch_size(t) * t["grad_accum"] * world
    ds["gradient_clipping"] = t["max_grad_norm"]
    ds["bf16"] = {"enabled": t["precision"] == "bf16"}
    ds["fp16"] = {"enabled": t["precision"] == "fp16"}
    return ds


def flash_attention_available() -> dict[str, bool]:
    """Which of transformers' variable-length flash attentions this machine can run (CUDA + package)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    return {"flash_attention_3": is_flash_attn_3_available(), "flash_attention_2": is_flash_attn_2_available()}


def choose_attention(requested: str, batching: str, precision: str = "bf16") -> tuple[str, str]:
    """(attn_implementation for transformers, what actually computes attention), per device.

    Packed rows carry their boundaries (`cu_seq_lens_q/k`, `max_length_q/k`) from the collator, so
    every choice here runs without a per-layer host sync:
    - CUDA: transformers' flash_attention_3, else flash_attention_2 (both variable-length over the
      collator's boundaries); without flash-attn, ftflow's packed attention, which calls torch's own
      variable-length flash kernel (`torch.nn.attention.varlen`) where torch has it;
    - CPU: ftflow's per-sample causal sdpa (boundaries as Python ints, once per batch): measured the
      fastest there (bench/RESULTS.md).
    Padded batches: flash when installed on CUDA (it unpads by the attention mask), else sdpa.
    Flash kernels take bf16/fp16 only: with precision fp32, auto never picks them.
    An explicit choice is honoured; a flash one this machine cannot run fails here, naming the key.
    """
    from tasks.collate import _torch_varlen_attn, register_packed_attention

    cuda = torch.cuda.is_available()
    flash = flash_attention_available() if cuda else {}
    half = precision in ("bf16", "fp16")
    if requested in ("flash_attention_3", "flash_attention_2") and not flash.get(requested):
        raise RuntimeError(
            f"train.attn_implementation={requested}, but this machine cannot run it "
            f"({'flash-attn is not installed' if cuda else 'no CUDA device'}); set train.attn_implementation=auto."
        )
    if requested == "auto":
        best = next((name for name in ("flash_attention_3", "flash_attention_2") if flash.get(name) and half), None)
        if best:
            requested = best
        else:
            requested = "ftflow_packed_sdpa" if batching == "packed" else "sdpa"
    if requested == "ftflow_packed_sdpa":
        kernel = "torch varlen_attn (flash)" if cuda and half and _torch_varlen_attn is not None else "per-sample causal sdpa"
        return register_packed_attention(), kernel
    if requested.startswith("flash_attention"):
        return requested, f"{requested} varlen" if batching == "packed" else requested
    if batching == "packed" and requested in ("sdpa", "eager"):
        log.warning("train.attn_implementation=%s on packed rows builds a dense (T, T) block mask: exact, but "
                    "attention costs (sum of lengths)^2; auto avoids it", requested)
    return requested, requested


def choose_liger(requested: bool | str, zero_stage: int | None, loss_chunk_tokens: int) -> dict[str, bool] | None:
    """Liger kernels' config for the Trainer (`liger_kernel_config`), or None for none.

    auto: on CUDA when liger-kernel is installed. Its fused linear cross-entropy reads the head's
    weight directly, which under ZeRO-3 is a partition (the gather hooks never run), so it is off
    there, and off when `tasks.loss` chunks the loss already (the CPU counterpart of the same saving).
    """
    from transformers.utils import is_liger_kernel_available

    cuda = torch.cuda.is_available()
    usable = cuda and is_liger_kernel_available()
    if requested is True and not usable:
        raise RuntimeError(
            "train.liger=true, but liger kernels need CUDA and the liger-kernel package "
            f"({'not installed' if cuda else 'no CUDA device'}); set train.liger=auto or false."
        )
    if requested is False or not usable:
        return None
    return {"rope": True, "rms_norm": True, "swiglu": True,
            "fused_linear_cross_entropy": zero_stage != 3 and not loss_chunk_tokens, "cross_entropy": False}


def choose_optimizer() -> str:
    """torch's fused AdamW on CUDA (one kernel for every tensor; ZeRO runs it on its fp32 partitions),
    the plain loop on CPU, where the fused one is not faster."""
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def is_complete_checkpoint(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(ckpt_root: Path, max_steps: int = -1) -> Path | None:
    """Newest `checkpoint-N` folder that carries the completion marker; partial ones are ignored.

    With `max_steps` > 0, a checkpoint at (or past) the last step is not a resume point: the
    Trainer, resumed there, runs one more optimizer step before it checks `max_steps` (its loop
    tests the limit after a step, and the epoch is not over when `max_steps` is not a multiple of
    the epoch's steps). A run killed after that last checkpoint but before `final/` was complete
    therefore resumes from the checkpoint before it, and ends on the same weights."""
    if not ckpt_root.is_dir():
        return None
    done = [p for p in ckpt_root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and is_complete_checkpoint(p)]
    if max_steps > 0:
        done = [p for p in done if int(p.name.split("-")[-1]) < max_steps]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def load_model(job: Job, args, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Full, LoRA or Q-LoRA model; with ZeRO-3 active the weights are partitioned as they load."""
    from transformers import AutoModelForCausalLM

    t = job.train
    dtype = _dtype(t["precision"])
    if t["mode"] == "full" and not job.deepspeed_config and dtype != torch.float32:
        # Without DeepSpeed nothing would keep fp32 master weights: bf16 weights would lose every
        # update below their rounding step (lr 1e-5 x a 0.02 weight). Keep the weights in fp32 and
        # let the Trainer's autocast run the compute in bf16/fp16. (LoRA adapters are fp32 anyway.)
        dtype = torch.float32
    kwargs: dict[str, Any] = dict(
        dtype=dtype, trust_remote_code=job.trust_remote_code, revision=job.revision,
        attn_implementation=attn_implementation,
    )
    if t["mode"] == "qlora":
        from transformers import BitsAndBytesConfig

        q = t["quant"]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q["quant_type"],
            bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]),
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(job.model_path, **kwargs)
    model.config.use_cache = False  # no KV cache in training: it would also break packed attention

    if t["mode"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if t["mode"] == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=t["gradient_checkpointing"]
            )
        lc = t["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lc["r"],
                lora_alpha=lc["alpha"],
                lora_dropout=lc["dropout"],
                target_modules=lc["target_modules"],
                modules_to_save=lc["modules_to_save"] or None,
                use_dora=lc["use_dora"],
                task_type="CAUSAL_LM",
            ),
        )
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def build_callbacks(job: Job, collator, trainable: int, total: int, recorded: dict[str, Any] | None = None):
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        """Every rank has written its shard once `on_save` runs; then rank 0 marks it complete."""

        def on_save(self, args, state, control, **kw):
            barrier()
            if rank() == 0:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                tmp = ckpt / (COMPLETE_MARKER + ".tmp")
                tmp.write_text(json.dumps({"global_step": state.global_step, "world_size": world_size()}))
                os.replace(tmp, ckpt / COMPLETE_MARKER)
            barrier()

    class Throughput(TrainerCallback):
        """Tokens and trained tokens (labels != -100) per second, summed over ranks."""

        def __init__(self):
            self.t0 = time.perf_counter()
            self.last = (0, 0)

        def on_log(self, args, state, control, logs=None, **kw):
            counts = torch.tensor([collator.tokens_seen, collator.trained_tokens_seen], dtype=torch.float64)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
            now = time.perf_counter()
            dt = max(now - self.t0, 1e-9)
            tokens, trained = counts.tolist()
            if logs is not None:
                logs["tokens_per_s"] = (tokens - self.last[0]) / dt
                logs["trained_tokens_per_s"] = (trained - self.last[1]) / dt
                logs["trained_tokens"] = trained
            self.t0, self.last = now, (tokens, trained)

    class MlflowMetrics(TrainerCallback):
        """Rank 0 logs into the run the flow created (never a new or orphan run)."""

        def __init__(self):
            from mlflow import MlflowClient

            self.client = MlflowClient(job.mlflow_tracking_uri)
            self.run_id = job.mlflow_run_id
            self.client.log_param(self.run_id, "trainable_parameters", trainable)
            self.client.log_param(self.run_id, "total_parameters", total)
            for k, v in (recorded or {}).items():  # what the run used: attention, optimizer, kernels
                try:
                    self.client.log_param(self.run_id, k, v)
                except Exception as err:  # tracking is not worth a training run
                    log.warning("could not log %s to MLflow: %s", k, err)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            metrics = [
                Metric(k.replace("train_", ""), float(v), ts, state.global_step)
                for k, v in logs.items()
                if isinstance(v, (int, float)) and math.isfinite(float(v)) and k != "epoch"
            ]
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as err:  # tracking is not worth a training run
                log.warning("could not log metrics to MLflow: %s", err)

    class LogLine(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()}
                log.info("step %d/%d %s", state.global_step, state.max_steps, shown)

    class ProgressLine(TrainerCallback):
        """`FTFLOW_PROGRESS {json}` lines the launcher turns into the Prefect progress artifacts
        (flows/monitor.py): where training begins (a resumed run: its checkpoint's step), every
        optimizer step at most once a second and the last one, and every logging step's figures."""

        def __init__(self):
            self.last = 0.0

        def _line(self, state, **extra):
            log.info("FTFLOW_PROGRESS %s", json.dumps({"step": state.global_step, "max_steps": state.max_steps, **extra}))

        def on_train_begin(self, args, state, control, **kw):
            self._line(state, event="begin")

        def on_step_end(self, args, state, control, **kw):
            now = time.monotonic()
            if now - self.last >= 1.0 or state.global_step >= state.max_steps:
                self.last = now
                self._line(state)

        def on_log(self, args, state, control, logs=None, **kw):
            keep = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch")
            self._line(state, **{k: float(logs[k]) for k in keep if isinstance((logs or {}).get(k), (int, float))})

    callbacks = [CompletionMarker(), Throughput()]
    if rank() == 0:
        callbacks.append(LogLine())
        callbacks.append(ProgressLine())
        if job.mlflow_run_id:
            callbacks.append(MlflowMetrics())
    return callbacks


def chunked_loss_trainer(model: torch.nn.Module, chunk_tokens: int):
    """A Trainer class and its kwargs computing the loss with `tasks.loss.chunked_causal_lm_loss`.

    The model runs as usual but returns the final hidden states and the logits of one position
    only (`logits_to_keep=1`); the loss goes through the Trainer's `compute_loss_func`, so its
    scaling (num_items_in_batch, gradient accumulation, ranks) is the Trainer's own. The head is
    called as a module, chunk by chunk, so ZeRO-3 gathers its weight the way it gathers any layer.
    """
    from transformers import Trainer

    from tasks.loss import chunked_causal_lm_loss

    head = model.get_output_embeddings()

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "output_hidden_states": True, "logits_to_keep": 1}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def loss(outputs, labels, num_items_in_batch=None):
        return chunked_causal_lm_loss(outputs.hidden_states[-1], head, labels, chunk_tokens, num_items_in_batch)

    return ChunkedLossTrainer, {"compute_loss_func": loss}


@torch.no_grad()
def reference_logits(model: torch.nn.Module, inputs: list[list[int]]) -> torch.Tensor:
    """Logits of the trained model on fixed inputs, every rank taking part (ZeRO-3 gathers per layer)."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    for ids in inputs:
        x = torch.tensor([ids], device=device)
        outs.append(model(input_ids=x, use_cache=False).logits[0].float().cpu())
    model.train()
    return torch.cat(outs, dim=0)


@torch.no_grad()
def unquantised_reference_logits(job: Job, qmodel: torch.nn.Module, inputs: list[list[int]]) -> torch.Tensor:
    """Q-LoRA: logits of the fp32 base from disk with this rank's trained adapter applied."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(qmodel).items()}
    base = AutoModelForCausalLM.from_pretrained(
        job.model_path, dtype=torch.float32, trust_remote_code=job.trust_remote_code, revision=job.revision
    )
    model = PeftModel(base, qmodel.peft_config["default"])
    set_peft_model_state_dict(model, adapter)
    return reference_logits(model, inputs)


def main(job_path: str) -> int:
    logging.basicConfig(
        level=logging.INFO if rank() == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    from datasets import load_from_disk
    from transformers import Trainer, TrainingArguments, set_seed

    from tasks.collate import PackedCollator, PaddedCollator, TokenBudgetBins

    job = Job.load(job_path)
    t = job.train
    out = Path(job.output_dir)
    set_seed(t["seed"])
    world = world_size()
    on_gpu = torch.cuda.is_available()

    # Padding-free packing; each packed row carries its samples' boundaries from the collator, and the
    # attention runs per sample over them: no padding, no (T, T) block mask, attention cost
    # ~ sum(len^2), no host sync in any layer. Exact, and the fastest batching measured on CPU
    # (bench/RESULTS.md: 1.7x length-grouped padding). Which kernel: `choose_attention`.
    batching = "packed" if t["batching"] == "auto" else t["batching"]
    attn_implementation, attention_kernel = choose_attention(t.get("attn_implementation", "auto"), batching, t["precision"])

    ds_config = fill_deepspeed_config(job.deepspeed_config, t, world) if job.deepspeed_config else None
    zero_stage = (ds_config or {}).get("zero_optimization", {}).get("stage")
    liger_config = choose_liger(t.get("liger", "auto"), zero_stage, t["loss_chunk_tokens"])
    optimizer = choose_optimizer()
    if world > 1 and (ds_config or not dist.is_initialized()):
        # Before the model loads: ZeRO-3's zero.Init counts the world size from the process group.
        # Under Ray Train the group exists already (Ray joined it); DeepSpeed then adopts it.
        if ds_config:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        else:
            dist.init_process_group("nccl" if on_gpu else "gloo")
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=micro_batch_size(t),
        gradient_accumulation_steps=t["grad_accum"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_ratio"],  # a float < 1 is a ratio of the total steps
        weight_decay=t["weight_decay"],
        adam_beta2=t["adam_beta2"],
        max_grad_norm=t["max_grad_norm"],
        optim=optimizer,
        use_liger_kernel=liger_config is not None,
        liger_kernel_config=liger_config,
        torch_compile=bool(t.get("torch_compile")),
        bf16=t["precision"] == "bf16",
        fp16=t["precision"] == "fp16",
        activation_checkpointing=t["gradient_checkpointing"],  # transformers 5 name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if t["gradient_checkpointing"] else None,
        deepspeed=ds_config,
        save_strategy="steps",
        save_steps=t["save_steps"],
        save_total_limit=t["save_total_limit"],
        logging_steps=t["logging_steps"],
        logging_first_step=True,
        seed=t["seed"],
        data_seed=t["seed"],
        report_to="none",
        remove_unused_columns=False,
        # token-budget bins come in the order `TokenBudgetBins` gives them (balanced steps, shuffled per epoch)
        train_sampling_strategy=("sequential" if t.get("tokens_per_batch") else
                                 "group_by_length" if batching == "padded" and t["group_by_length"] else "random"),
        length_column_name="length",
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
        ddp_backend=None if on_gpu else "gloo",
        disable_tqdm=rank() != 0,
    )
    model = load_model(job, args, attn_implementation)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%s mode, %s batching, %d ranks)", f"{trainable:,}", f"{total:,}", t["mode"], batching, world)

    dataset = load_from_disk(job.dataset_path)
    if t.get("tokens_per_batch"):
        dataset = TokenBudgetBins(dataset, t["tokens_per_batch"], world, t["seed"])
        log.info("packing: %d bins of <= %d tokens (%d ranks)", len(dataset), t["tokens_per_batch"], world)
    collator = PackedCollator() if batching == "packed" else PaddedCollator(pad_token_id=job.pad_token_id)
    recorded = {
        "attn_implementation": attn_implementation, "attention_kernel": attention_kernel, "optimizer": optimizer,
        "liger": ",".join(k for k, v in liger_config.items() if v) if liger_config else "off",
        "torch_compile": bool(t.get("torch_compile")), "tokens_per_batch": t.get("tokens_per_batch", 0),
    }
    log.info("kernels: %s", recorded)
    trainer_class, loss_kwargs = Trainer, {}
    if t["loss_chunk_tokens"]:
        trainer_class, loss_kwargs = chunked_loss_trainer(model, t["loss_chunk_tokens"])
        log.info("loss: LM head + cross-entropy %d trained tokens at a time", t["loss_chunk_tokens"])
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=build_callbacks(job, collator, trainable, total, recorded),
        **loss_kwargs,
    )
    if job.resume_from:
        log.info("resuming from %s", job.resume_from)
    result = trainer.train(resume_from_checkpoint=job.resume_from)

    # Final state: a ZeRO checkpoint for the consolidate stage (or a plain state dict without DeepSpeed).
    final = out / "final"
    if trainer.is_deepspeed_enabled:
        # LoRA / Q-LoRA: the adapter (and modules_to_save) only, as the Trainer's own PEFT checkpoints
        # do; the frozen base is read from its own folder at export, never copied here.
        trainer.model_wrapped.save_checkpoint(str(final), tag="final", exclude_frozen_parameters=t["mode"] in ("lora", "qlora"))
    elif rank() == 0:
        trainer.save_model(str(final))
    if rank() == 0 and t["mode"] in ("lora", "qlora"):
        # The adapter's config travels with the weights, naming the (un-quantised) base it adapts.
        peft_cfg = trainer.model.peft_config["default"]
        peft_cfg.base_model_name_or_path = job.model_path
        peft_cfg.save_pretrained(str(final))
    barrier()
    if job.reference_inputs:
        from safetensors.torch import save_file

        logits = reference_logits(trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model, job.reference_inputs)
        # The precision the reference was computed in travels with it, so the export is checked in
        # it: the weights' dtype, and the Trainer's autocast (which stays on the model's forward)
        # when bf16/fp16 runs without DeepSpeed.
        computed_in = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
        autocast = "" if t["precision"] == "fp32" or trainer.is_deepspeed_enabled else str(_dtype(t["precision"])).removeprefix("torch.")
        if rank() == 0 and t["mode"] == "qlora":
            # The export is the adapter for the UN-quantised base, so its reference is that base (fp32,
            # from disk) with the adapter tensors as trained here; the 4-bit model's own logits are kept
            # alongside to show the quantisation gap.
            save_file({"logits": logits.contiguous()}, str(final / "reference_logits_quantized.safetensors"))
            logits, computed_in, autocast = unquantised_reference_logits(job, trainer.model, job.reference_inputs), "float32", ""
        if rank() == 0:
            save_file({"logits": logits.contiguous()}, str(final / "reference_logits.safetensors"),
                      metadata={"dtype": computed_in, "autocast": autocast})
    if rank() == 0:
        summary = {
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "world_size": world,
            "batching": batching,
            # what computed the loss: the model's own (transformers) or tasks.loss, chunked
            "loss": f"chunked:{t['loss_chunk_tokens']}" if trainer.compute_loss_func is not None else "model",
            "deepspeed_stage": (ds_config or {}).get("zero_optimization", {}).get("stage"),
            "mode": t["mode"],
            "precision": t["precision"],
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            **recorded,
            # this rank's peak of allocated GPU memory (rank 0; ZeRO gives every rank about the same)
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "log_history": trainer.state.log_history,
        }
        (final / "train_summary.json").write_text(json.dumps(summary, indent=2))
        (final / (COMPLETE_MARKER + ".tmp")).write_text(json.dumps({"global_step": trainer.state.global_step}))
        os.replace(final / (COMPLETE_MARKER + ".tmp"), final / COMPLETE_MARKER)
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
