"""GPU training throughput and MFU: Qwen2.5-0.5B shape, bf16, packed rows (a benchmark, not a test;
moved unchanged from the former bench_train.py --gpu).

    python -m bench.bench_gpu        # skipped with a message when there is no CUDA device

One process, random-init model built from config, `PackedCollator` rows, AdamW; the first 5 steps
are warm-up. Results go to bench/results/train_gpu.json. Goal: MFU >= 40% of the dense bf16 peak.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "train_gpu.json"

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def matmul_peak_tflops(dtype, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul rate: the ceiling MFU is also reported against."""
    import torch

    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def gpu_packed(steps: int = 30, tokens_per_step: int = 32768, max_len: int = 2048) -> dict:
    """Qwen2.5-0.5B shape (config only, random init), bf16 weights, AdamW, packed rows via `PackedCollator`.

    MFU = tokens/s x (6 N_matmul + attention) / peak, where N_matmul counts every matmul weight
    (the tied lm_head once, embeddings' lookup excluded) and attention adds, per packed step,
    6 x layers x (heads x head_dim) x sum(len_i^2) FLOPs (QK^T and AV, forward + backward, causal half).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.collate import PackedCollator, register_packed_attention

    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = register_packed_attention()  # exact per-sample causal sdpa (flash kernel per slice)
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_05B)
    cfg._attn_implementation = attn
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = n_total - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)  # lm_head counts, lookup not
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    rng = random.Random(0)
    collator = PackedCollator()

    def batch():
        feats, total = [], 0
        while total < tokens_per_step:
            n = min(max_len, max(32, int(rng.lognormvariate(math.log(300), 0.9))), tokens_per_step - total)
            if n < 32:
                break
            ids = [rng.randrange(10, cfg.vocab_size) for _ in range(n)]
            cut = n // 3  # the prompt third is not trained
            feats.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
            total += n
        b = collator(feats)
        return {k: v.cuda(non_blocking=True) for k, v in b.items()}, sum(len(f["input_ids"]) ** 2 for f in feats)

    batches = [batch() for _ in range(steps)]
    torch.cuda.reset_peak_memory_stats()
    warm = 5
    for i, (b, _) in enumerate(batches):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timed = batches[warm:]
    tokens = sum(b["input_ids"].numel() for b, _ in timed)
    trained = sum(int((b["labels"] != -100).sum()) for b, _ in timed)
    flops = 6 * n_matmul * tokens + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * sum(s for _, s in timed)
    measured = matmul_peak_tflops(torch.bfloat16)
    name = torch.cuda.get_device_name()
    spec = 989.4 if "H100" in name else (989.4 if "H200" in name else None)  # dense bf16, SXM, TFLOP/s
    achieved = flops / seconds / 1e12
    return {
        "device": name, "attn_implementation": attn, "params": n_total, "params_matmul": n_matmul,
        "max_length": max_len, "tokens_per_step": tokens_per_step, "timed_steps": len(timed),
        "tokens_per_s": round(tokens / seconds), "trained_tokens_per_s": round(trained / seconds),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "achieved_tflops": round(achieved, 1), "measured_matmul_tflops": round(measured, 1),
        "spec_bf16_tflops": spec,
        "mfu_vs_spec": round(achieved / spec, 3) if spec else None,
        "mfu_vs_measured_matmul": round(achieved / measured, 3),
        "formula": "MFU = tokens/s x (6 N_matmul + 6 L d sum(len^2)/tokens) / peak",
    }


def gpu_main(out: Path) -> int:
    import torch

    if not torch.cuda.is_available():
        result = {"skipped": "no CUDA device: the GPU benchmark (Qwen2.5-0.5B shape, bf16, packed, MFU) runs only on a GPU"}
        print(f"GPU benchmark skipped: {result['skipped']}")
    else:
        result = gpu_packed()
        result["goals_met"] = {"MFU >= 40%": bool(result["mfu_vs_spec"] and result["mfu_vs_spec"] >= 0.40)}
        print(json.dumps(result, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0



if __name__ == "__main__":
    raise SystemExit(gpu_main(OUT))
