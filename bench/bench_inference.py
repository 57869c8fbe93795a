"""Scoring throughput: seed 004's one-prompt-at-a-time loop vs `tasks.evaluate.generate_batch` (a benchmark, not a test).

    python -m bench.bench_inference                               # embedded tiny Qwen2, demo eval data
    python -m bench.bench_inference --model models:/ftflow-demo@champion --max-new-tokens 32
    python -m bench.bench_inference --threads 1                   # on a busy shared CPU
    python -m bench.bench_inference --noise 0.3                   # replies that differ per prompt

Both loops run greedy decoding on the same model and prompts (rendered with the model's chat
template) and must produce the same replies; the benchmark fails otherwise. The seed loop is
seed 004's: tokenize one prompt, `model.generate(**inputs, generation_config=...)`, decode.
Note: the random-init tiny model never emits end-of-turn, so every reply runs to
`--max-new-tokens` in both loops; with a trained model, batches also wait for their longest reply.

Then the product's eval path (`tasks.evaluate.evaluate_model`: generation, scores and the
teacher-forced loss) runs on the same model, data, batch size and max_new_tokens in a fresh
process, and its peak RSS is reported beside that of a process that only loads the model (the
difference is what evaluation itself holds). `--noise` does not apply there (the model is read
from `--model`). On the real vocabulary (issue 16, 151,665 tokens), e.g.

    python -m bench.bench_inference --model /tmp/qwen2.5-tiny --batch-size 25 --max-new-tokens 4

where the folder is `tests/realvocab.py`'s `real_tiny_model_dir`.
Results go to bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "reverse_eval.jsonl"


def seed_loop(model, tokenizer, prompts_messages, max_new_tokens: int, eos_ids: list[int]) -> list[str]:
    """Seed 004's evaluation loop, with the chat template instead of a hand-written [INST] prompt
    and the same stop ids as `generate_batch` (the comparison is about batching, not stopping)."""
    import torch
    from transformers import GenerationConfig

    generation_config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids)
    out = []
    for messages in prompts_messages:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            seq = model.generate(**inputs, generation_config=generation_config)
        new = seq[0, inputs["input_ids"].shape[1]:]
        out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


_EVAL_CHILD = """
import json, resource, sys, time
import torch
model, data, batch_size, max_new_tokens, max_samples, threads, load_only = sys.argv[1:8]
if int(threads):
    torch.set_num_threads(int(threads))
from tasks.evaluate import evaluate_model, load_for_inference
t0 = time.perf_counter()
out = {}
if load_only == "1":
    load_for_inference(model)
else:
    r = evaluate_model(model, data, gen={"max_new_tokens": int(max_new_tokens)}, batch_size=int(batch_size),
                       max_samples=int(max_samples) if max_samples != "-" else None)
    out = {"loss": r.metrics["loss"], "n": r.metrics["n"]}
out.update(seconds=time.perf_counter() - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("EVAL_CHILD " + json.dumps(out))
"""


def eval_peak_rss(model: str, data: str, batch_size: int, max_new_tokens: int, max_samples: int | None,
                  threads: int | None) -> dict:
    """Peak RSS (MB) of `evaluate_model` in a fresh process, and of a process that only loads the model."""
    import subprocess
    import sys

    res = {}
    for key, load_only in (("load_only", "1"), ("evaluate_model", "0")):
        proc = subprocess.run(
            [sys.executable, "-c", _EVAL_CHILD, model, data, str(batch_size), str(max_new_tokens),
             str(max_samples) if max_samples else "-", str(threads or 0), load_only],
            cwd=REPO, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"eval child ({key}) failed:\n{proc.stderr[-3000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("EVAL_CHILD "))
        res[key] = {k: round(v, 4) for k, v in json.loads(line[len("EVAL_CHILD "):]).items()}
    res["eval_over_load_mb"] = round(res["evaluate_model"]["peak_rss_mb"] - res["load_only"]["peak_rss_mb"], 1)
    return res


def main(argv: list[str] | None = None) -> int:
    import torch

    from tasks.evaluate import generate_batch, load_for_inference, read_eval_jsonl, stop_token_ids

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:tiny-qwen2", help="models:/NAME@ALIAS, a folder, or embedded:tiny-qwen2")
    ap.add_argument("--data", default=str(DEMO), help="canonical eval JSONL")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both loops (default: torch's choice). On a shared or busy "
                         "machine 1 avoids thread-pool contention that slows every matmul ~10x")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="re-draw the weights from N(0, NOISE) (seed 1) so that replies differ per prompt and "
                         "some stop: the random-init tiny model repeats one token, which makes equality trivial")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, _ = load_for_inference(args.model)
    if args.noise:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, args.noise)
    eos_ids = stop_token_ids(model, tokenizer)
    prompts = [r["messages"][:-1] for r in read_eval_jsonl(args.data, args.max_samples)]
    n = len(prompts)

    seed_loop(model, tokenizer, prompts[:1], 2, eos_ids)  # warm-up: first-call allocations, kernel selection
    t0 = time.perf_counter()
    seed_out = seed_loop(model, tokenizer, prompts, args.max_new_tokens, eos_ids)
    seed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch_out = generate_batch(model, tokenizer, prompts, {"max_new_tokens": args.max_new_tokens}, args.batch_size)
    batch_s = time.perf_counter() - t0

    mismatches = [i for i, (a, b) in enumerate(zip(seed_out, batch_out)) if a != b["prediction"]]
    memory = eval_peak_rss(args.model, args.data, args.batch_size, args.max_new_tokens, args.max_samples, args.threads)
    result = {
        "model": args.model,
        "data": str(args.data),
        "n": n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "seed_loop": {"seconds": round(seed_s, 3), "samples_per_s": round(n / seed_s, 3)},
        "generate_batch": {"seconds": round(batch_s, 3), "samples_per_s": round(n / batch_s, 3)},
        "speedup": round(seed_s / batch_s, 2),
        "outputs_equal": not mismatches,
        "mismatched_ids": mismatches[:20],
        "noise": args.noise,
        "distinct_replies": len({o["prediction"] for o in batch_out}),
        "no_stop_rate": sum(not o["stopped"] for o in batch_out) / n,
        "vocab_size": len(tokenizer),
        "eval_memory": memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.model} on {n} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"{result['device']} {result['dtype']}, {result['torch_threads']} threads")
    print(f"{'loop':<28}{'seconds':>10}{'samples/s':>12}{'ratio':>8}")
    print(f"{'seed 004 (one at a time)':<28}{seed_s:>10.2f}{n / seed_s:>12.2f}{1.0:>8.2f}")
    print(f"{f'generate_batch (bs={args.batch_size})':<28}{batch_s:>10.2f}{n / batch_s:>12.2f}{seed_s / batch_s:>8.2f}")
    print(f"outputs equal: {not mismatches}" + (f" (mismatches at {mismatches[:10]})" if mismatches else "")
          + f"; {result['distinct_replies']} distinct replies, no-stop rate {result['no_stop_rate']:.2f}")
    print(f"evaluate_model (generation + scores + loss, bs={args.batch_size}, vocabulary {len(tokenizer):,}): "
          f"peak RSS {memory['evaluate_model']['peak_rss_mb']:,.0f} MB, model load alone "
          f"{memory['load_only']['peak_rss_mb']:,.0f} MB (+{memory['eval_over_load_mb']:,.0f} MB), "
          f"{memory['evaluate_model']['seconds']:.1f} s")
    print(f"wrote {out}")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
