"""The GPU check: ftflow's real training path on a CUDA machine, in one command (a benchmark, not a test).

    python -m bench.gpu                 # ~3-5 minutes on one H100; no network
    bench/gpu_check.sh                  # the same, with the project's virtualenv
    python -m bench.gpu --steps 10 --skip-lora

Without CUDA it prints one line saying it skipped and exits 0 (and writes nothing, so an earlier
GPU result is kept). On CUDA, every figure comes from the product path: `tasks.train.run_training`
(the launcher: torchrun, one rank per visible GPU) running `tasks.train_worker` (the recipe every
run uses), on data and models made here:

1. full: a Qwen2.5-0.5B-shaped model (config of Qwen/Qwen2.5-0.5B, random init, the real 151,936-token
   vocabulary), full fine-tuning in bf16 under DeepSpeed ZeRO-2, packed to 2,048 tokens a micro-batch
   (`train.tokens_per_batch`), attention/optimizer/liger as `auto` picks them, ~30 steps;
2. lora: a 7B-shaped slice (Qwen2.5-7B's widths, 152,064 vocabulary, 4 of its 28 layers), LoRA r=16
   on every linear layer, bf16, ZeRO-2, 4,096 tokens a micro-batch, ~30 steps;
3. attention: fwd+bwd of one packed row, per-sample causal sdpa loop (the boundaries read back from
   position_ids, as the old path did in every layer) against variable-length flash attention over
   the collator's boundaries (torch's varlen_attn; flash-attn's too when installed), across length mixes.

Printed and written to bench/results/gpu.json: tokens/s (every position; median over the steps after
a warm-up), MFU, peak GPU memory, what the run used (attention, optimizer, liger), and the
micro-benchmark. MFU counts model FLOPs only (no recompute), LoRA-aware (`train_flops`), against the
GPU's dense bf16 peak from its name (`PEAK_BF16_TFLOPS`; unknown GPUs get no MFU). Goal on an H100:
>= 40% MFU for the 0.5B full fine-tune (llm-foundry reports 38-43% at 1B).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s. Matched in this
# order against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),  # SXM (GH200 too)
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def hf_config(self) -> dict:
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    tie_word_embeddings=self.tie, max_position_embeddings=32768, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, use_cache=False)


QWEN25_05B = Shape(vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, tie=True)
QWEN25_7B_SLICE = Shape(vocab=152064, hidden=3584, intermediate=18944, layers=4, heads=28, kv_heads=4, tie=False)


def linear_shapes(s: Shape) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer: q, k, v, o, gate, up, down."""
    kv = s.kv_heads * s.head_dim
    return [(s.hidden, s.hidden), (s.hidden, kv), (s.hidden, kv), (s.hidden, s.hidden),
            (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]


def matmul_params(s: Shape) -> int:
    """Weights that take part in a matmul per token: every linear layer and the LM head (counted
    once even when tied to the embedding, whose lookup is no matmul). Biases and norms left out."""
    return s.layers * sum(i * o for i, o in linear_shapes(s)) + s.vocab * s.hidden


def lora_params(s: Shape, r: int) -> int:
    """LoRA on every linear layer of every decoder layer (PEFT's all-linear leaves the head out): r x (in + out) each."""
    return s.layers * sum(r * (i + o) for i, o in linear_shapes(s))


def train_flops(s: Shape, seq_lens: list[int], lora_r: int | None = None) -> float:
    """Model FLOPs of one training pass (forward + backward) over packed samples of these lengths.

    Matmuls, per token: forward 2 N; backward 2 N for the input gradients + 2 N for the weight
    gradients. Full fine-tuning: 6 N. LoRA: the frozen base needs no weight gradients (4 N) and
    the adapters take 6 N_lora. Attention, per sample of length n and per layer: QK^T and AV are
    2 x (2 n^2 H d) FLOPs, half of it under the causal mask, i.e. 2 n^2 H d forward, x3 with the
    backward: 6 L H d n^2. Activation recomputation (gradient checkpointing) is not counted (MFU,
    not hardware FLOPs).
    """
    tokens = sum(seq_lens)
    n = matmul_params(s)
    matmul = (6 * n * tokens) if lora_r is None else (4 * n * tokens + 6 * lora_params(s, lora_r) * tokens)
    attention = 6 * s.layers * s.heads * s.head_dim * sum(x * x for x in seq_lens)
    return float(matmul + attention)


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, gpus: int = 1) -> float | None:
    """Achieved model FLOP/s (tokens/s over all GPUs x model FLOPs a token) over the GPUs' summed
    dense bf16 peak (TFLOP/s each); None for an unknown peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12 * gpus)


# ----------------------------------------------------------------------------------------- data


def sample_lengths(n: int, max_len: int, seed: int, median: int = 300) -> list[int]:
    """Log-normal lengths (median ~300, sigma 0.9: chat SFT data), clipped to [16, max_len]."""
    rng = random.Random(seed)
    return [min(max_len, max(16, int(rng.lognormvariate(math.log(median), 0.9)))) for _ in range(n)]


def make_dataset(path: Path, vocab: int, lengths: list[int], seed: int) -> None:
    """A tokenized dataset as the tokenize stage writes it (input_ids, labels, length, id), random
    token ids; the first third of each sample is a prompt (label -100)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"id": [], "input_ids": [], "labels": [], "length": []}
    for k, n in enumerate(lengths):
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        rows["id"].append(str(k))
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * (n // 3) + ids[n // 3:])
        rows["length"].append(n)
    Dataset.from_dict(rows).save_to_disk(str(path))


def make_model(path: Path, shape: Shape) -> None:
    """Random init (seed 0) of the shape, saved in bf16 safetensors like a hub checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape.hf_config())).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    del model
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- training


def run(name: str, shape: Shape, work: Path, *, steps: int, tokens_per_batch: int, lora_r: int | None) -> dict:
    """One training through the launcher and the worker; figures from its train_summary.json."""
    import torch

    from ftflow.config import LoraConfig, TrainConfig
    from tasks.train import run_training

    model_dir, data_dir = work / f"{name}-model", work / f"{name}-data"
    make_model(model_dir, shape)
    # Enough samples for every step (a bin holds ~tokens_per_batch tokens), one epoch.
    lengths = sample_lengths(int(steps * tokens_per_batch / 300 * 1.6) + 64, min(2048, tokens_per_batch), seed=1)
    make_dataset(data_dir, shape.vocab, lengths, seed=2)
    gpus = torch.cuda.device_count()
    train = TrainConfig(
        mode="lora" if lora_r else "full", deepspeed="configs/deepspeed/zero2.json", nproc_per_node=gpus,
        precision="bf16", max_steps=steps, tokens_per_batch=tokens_per_batch, grad_accum=1,
        learning_rate=2e-4 if lora_r else 1e-5, lr_scheduler="constant", logging_steps=1, save_steps=10_000,
        timeout_minutes=6, gradient_checkpointing=False,
        lora=LoraConfig(r=lora_r or 8, alpha=2 * (lora_r or 8), dropout=0.0),
    )
    t0 = time.perf_counter()
    summary = run_training(train=train, train_dir=work / f"{name}-train", model_path=str(model_dir),
                           dataset_path=str(data_dir), pad_token_id=0)
    wall = time.perf_counter() - t0
    logs = [h for h in summary["log_history"] if "tokens_per_s" in h and h.get("step", 0) > 5]  # after warm-up
    tokens_per_s = statistics.median(h["tokens_per_s"] for h in logs) if logs else None
    # FLOPs per token of this data: every sample is in one bin, so the attention share is the dataset's.
    flops_per_token = train_flops(shape, lengths, lora_r) / sum(lengths)
    name_gpu = torch.cuda.get_device_name()
    peak = peak_tflops(name_gpu)
    achieved = tokens_per_s * flops_per_token if tokens_per_s else None
    return {
        "shape": asdict(shape), "mode": train.mode, "lora_r": lora_r, "gpus": gpus, "steps": summary["global_step"],
        "tokens_per_batch": tokens_per_batch, "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
        "trained_tokens_per_s": round(statistics.median(h["trained_tokens_per_s"] for h in logs)) if logs else None,
        "flops_per_token": flops_per_token,
        "achieved_tflops_per_gpu": round(achieved / 1e12 / gpus, 1) if achieved else None,
        "peak_bf16_tflops": peak,
        "mfu": round(mfu(tokens_per_s, flops_per_token, peak, gpus), 4) if tokens_per_s and peak else None,
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "used": {k: summary.get(k) for k in ("attn_implementation", "attention_kernel", "optimizer", "liger",
                                               "torch_compile", "deepspeed_stage", "gradient_checkpointing")},
        "losses": [h["loss"] for h in summary["log_history"] if "loss" in h],
    }


# ------------------------------------------------------------------------------------ attention


LENGTH_MIXES = {
    "1 x 2048": [2048],
    "8 x 256": [256] * 8,
    "chat (log-normal, median 300)": None,  # drawn below to 8,192 tokens
    "64 x 32": [32] * 64,
}


def attention_bench(shape: Shape = QWEN25_05B, repeats: int = 20) -> list[dict]:
    """ms per fwd+bwd of one layer's attention over a packed row (bf16, the shape's heads)."""
    import torch
    import torch.nn.functional as F

    from tasks.collate import PackedCollator, _torch_varlen_attn

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    out = []
    for mix, lens in LENGTH_MIXES.items():
        if lens is None:
            lens, total = [], 0
            for n in sample_lengths(400, 2048, seed=3):
                if total + n > 8192:
                    break
                lens.append(n)
                total += n
        batch = PackedCollator()([{"input_ids": [1] * n, "labels": [1] * n} for n in lens])
        T, H, KV, D = sum(lens), shape.heads, shape.kv_heads, shape.head_dim
        q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = batch["cu_seq_lens_q"].cuda()
        pos = batch["position_ids"].cuda()
        m = batch["max_length_q"]

        def loop():  # the old path: boundaries read back from position_ids, one sdpa per sample
            cuts = (pos[0] == 0).nonzero().flatten().tolist() + [T]
            qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T, D)
            return torch.cat([F.scaled_dot_product_attention(qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b],
                                                             is_causal=True, enable_gqa=True)
                              for a, b in zip(cuts[:-1], cuts[1:])], dim=2)

        kernels = {"per-sample sdpa loop": loop}
        if _torch_varlen_attn is not None:
            kernels["torch varlen_attn"] = lambda: _torch_varlen_attn(q, k, v, cu, cu, m, m, window_size=(-1, 0),
                                                                       enable_gqa=True)
        if flash_attn_varlen_func is not None:
            kernels["flash_attn varlen"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)
        row = {"mix": mix, "samples": len(lens), "tokens": T}
        for kname, fn in kernels.items():
            for _ in range(3):
                fn().float().sum().backward()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                fn().float().sum().backward()
            torch.cuda.synchronize()
            row[f"{kname} ms"] = round((time.perf_counter() - t) / repeats * 1e3, 3)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: skipped: no CUDA device here (it runs the worker's GPU path on a machine with one)")
        return 0
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ftflow-bench-gpu-"))
    result: dict = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        result["attention"] = attention_bench()
        result["full_0.5b"] = run("full", QWEN25_05B, work, steps=args.steps, tokens_per_batch=2048, lora_r=None)
        if not args.skip_lora:
            result["lora_7b_slice"] = run("lora", QWEN25_7B_SLICE, work, steps=args.steps, tokens_per_batch=4096, lora_r=16)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    full = result["full_0.5b"]
    result["goals_met"] = {"0.5B full fine-tune MFU >= 40%": bool(full["mfu"] and full["mfu"] >= 0.40)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    print(f"written to {args.out}")
    return 0


def format_report(r: dict) -> str:
    lines = [f"{r['device']} x {r['gpus']}, torch {r['torch']}, {r['wall_s']} s"]
    for key in ("full_0.5b", "lora_7b_slice"):
        x = r.get(key)
        if x:
            mfu_s = f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a (unknown peak)"
            lines.append(f"{key}: {x['tokens_per_s']:,} tokens/s, MFU {mfu_s}, {x['achieved_tflops_per_gpu']} TFLOP/s "
                         f"per GPU, peak memory {x['peak_memory_gib']} GiB, steps {x['steps']}, used {x['used']}")
    lines.append("attention fwd+bwd, one layer (ms):")
    for row in r.get("attention", []):
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in row.items()))
    if "goals_met" in r:
        lines.append(f"goals: {r['goals_met']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
