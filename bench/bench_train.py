"""Training throughput: the seeds' recipe vs TRL's SFTTrainer vs ftflow's path, side by side
(a benchmark, not a test).

    python -m bench.bench_train                   # 120 samples, 3 repeats, every method
    python -m bench.bench_train --quick           # 24 samples, 1 repeat, 4 methods
    python -m bench.bench_train --methods ftflow_padded,ftflow_packed_varlen --repeats 5
    python -m bench.bench_train --gpu             # Qwen2.5-0.5B shape, bf16, packed, MFU (skipped without CUDA)

Workload (issue #8): generated SFT conversations whose token lengths are log-normal (median ~150,
clipped to 1,000), ~20% multi-turn, max_length 1024; a 4-layer, 256-wide Qwen2 (4 heads, 2 KV
heads, MLP 1024) built from config with a fixed random init, the embedded tiny-qwen2 tokenizer
(640 tokens); 2 torch threads; AdamW lr 5e-4 constant; one epoch, 8 samples a step.

Methods (every one trains the same samples once, in its own forked process, so peak RSS is its own):
- seed: seed 000's `preprocess` (per-message tokenizer calls, every sample padded to max_length),
  HF Trainer with the default collator, as the seeds run it;
- trl_packed: TRL SFTTrainer, packing="bfd" (padding-free, max_length 1024 rows, rows per step
  chosen so a step holds ~8 samples), assistant-only loss (the `assistant_masks` column), sdpa;
- trl_grouped: TRL SFTTrainer without packing, length-grouped sampling, assistant-only loss;
- ftflow_packed_varlen: what `tasks/train_worker.py` runs (batching=auto, i.e. packed):
  `PackedCollator` (the batch's samples in one row, position_ids restarting per sample) with
  `tasks.collate.packed_sdpa_attention` (causal sdpa per sample, no (T, T) mask);
- ftflow_padded: the worker's batching=padded: `PaddedCollator` (pad to the batch's longest),
  length-grouped sampling, sdpa;
- ftflow_packed: packed rows with plain sdpa (transformers' dense (T, T) block mask), for reference;
- ftflow_padded_varlen: padded batches with the per-sample attention (right padding keeps it exact).

Timing starts after the first optimizer step (warm-up) and ends with the last one; the tokens of
the first batch are left out accordingly. Figures: trained tokens/s (labels != -100), total
tokens/s (every position the model computes, pads included), padding share, peak RSS, train loss
(mean of the last 3 steps) and held-out loss (24 other samples, assistant tokens) after the epoch.
Each figure is the median over repeats; the methods run interleaved (repeat 1 of every method,
then repeat 2, ...), so a load spike on the shared machine hits all of them.
Results go to bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
GPU_RESULTS = Path(__file__).resolve().parent / "results" / "train_gpu.json"
MAX_LEN = 1024
BATCH = 8
LR = 5e-4
WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver winter button dragon "
    "pencil mirror castle orange rabbit window bridge planet coffee violin desert marble jacket island "
    "reverse these words please the poem moon light frost bed"
).split()
ALL_METHODS = ("seed", "trl_packed", "trl_grouped", "ftflow_padded", "ftflow_packed",
               "ftflow_packed_varlen", "ftflow_padded_varlen")
QUICK_SAMPLES, QUICK_METHODS = 24, ("seed", "trl_packed", "trl_grouped", "ftflow_packed_varlen")
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------
# data


def generate(path: Path, rows: int, tokens_per_word: float, seed: int) -> None:
    """Canonical JSONL whose rendered lengths are ~log-normal: median ~150 tokens, clipped to 1,000."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            budget = min(1000, max(24, int(rng.lognormvariate(math.log(150), 0.75))))
            turns = rng.randint(2, 4) if rng.random() < 0.2 else 1
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            per_turn = max(8.0, (budget - 6 * len(messages)) / turns - 10)  # ~5 template tokens a message
            for _ in range(turns):
                user = max(1, round(0.35 * per_turn / tokens_per_word))
                reply = max(1, round(0.65 * per_turn / tokens_per_word))
                messages += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=user))},
                             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=reply))}]
            f.write(json.dumps({"id": f"bench-{i}", "messages": messages, "source": "bench"}) + "\n")


def prepare(samples: int, tmp: Path) -> dict:
    """Everything the methods need, built once in the parent (before any fork)."""
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer

    from bench.bench_tokenize import seed_preprocess
    from tasks.base_model import resolve_model_path
    from tasks.tokenize import tokenize_dataset

    model_dir = resolve_model_path("embedded:tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probe = " ".join(random.Random(0).choices(WORDS, k=2000))
    tokens_per_word = len(tokenizer(probe).input_ids) / 2000

    train_jsonl, eval_jsonl = tmp / "train.jsonl", tmp / "eval.jsonl"
    generate(train_jsonl, samples, tokens_per_word, seed=0)
    generate(eval_jsonl, 24, tokens_per_word, seed=1)
    tok = lambda p: load_from_disk(str(tokenize_dataset(p, model_dir, cache_root=tmp / "cache", max_length=MAX_LEN,  # noqa: E731
                                                        length_policy="truncate").path))
    train, held_out = tok(train_jsonl), tok(eval_jsonl)

    rows = [json.loads(line) for line in open(train_jsonl, encoding="utf-8")]
    sources = [[{"from": m["role"], "value": m["content"]} for m in r["messages"] if m["role"] != "system"] for r in rows]
    seed = seed_preprocess(sources, tokenizer, MAX_LEN)
    seed_rows = [{"input_ids": seed["input_ids"][i].long(), "labels": seed["labels"][i].long(),
                  "attention_mask": seed["attention_mask"][i].long()} for i in range(len(rows))]

    trl = Dataset.from_dict({"input_ids": train["input_ids"],
                             "assistant_masks": [[int(x != -100) for x in lab] for lab in train["labels"]]})
    lengths = sorted(train["length"])
    mean_len = sum(lengths) / len(lengths)
    return {
        "model_dir": model_dir, "tokenizer": tokenizer, "vocab": len(tokenizer), "pad": tokenizer.pad_token_id,
        "ftflow": train, "held_out": held_out, "seed": seed_rows, "trl": trl,
        "trl_rows_per_step": max(1, round(BATCH * mean_len / MAX_LEN)),
        "data": {"samples": len(lengths), "tokens": sum(lengths), "median_len": lengths[len(lengths) // 2],
                 "p95_len": lengths[int(0.95 * (len(lengths) - 1))], "max_len": lengths[-1],
                 "multi_turn_share": round(sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows) / len(rows), 3),
                 "trained_tokens": sum(sum(x != -100 for x in lab) for lab in train["labels"])},
    }


# ---------------------------------------------------------------------------------------------
# one method, one repeat (runs in a forked child)


class Counting:
    """Wraps a collator; records (positions computed, real tokens, trained tokens) of every batch."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        b = self.inner(features)
        computed = b["input_ids"].numel()
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else computed
        self.batches.append((computed, real, int((b["labels"] != -100).sum())))
        return b


def build_model(prep: dict, attn: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)  # every method starts from the same weights
    cfg = Qwen2Config(vocab_size=prep["vocab"], pad_token_id=prep["pad"], eos_token_id=2, **MODEL_SHAPE)
    cfg._attn_implementation = attn
    model = Qwen2ForCausalLM(cfg)
    model.config.use_cache = False
    return model


def held_out_loss(model, rows) -> float:
    """Mean cross-entropy per trained token over the held-out samples (one at a time, no padding)."""
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([r["labels"]])
            k = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * k
            n += k
    return total / n


def run_method(method: str, prep: dict, threads: int) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from tasks.collate import PackedCollator, PaddedCollator, register_packed_attention

    torch.set_num_threads(threads)
    attn = register_packed_attention() if method.endswith("_varlen") else "sdpa"
    model = build_model(prep, attn)
    clock = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                clock["t1"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["t_end"] = time.perf_counter()

    common = dict(output_dir=tempfile.mkdtemp(prefix="ftflow-bench-train-"), num_train_epochs=1, learning_rate=LR,
                  lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1, save_strategy="no",
                  report_to="none", seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    if method.startswith("trl"):
        from trl import SFTConfig, SFTTrainer
        packed = method == "trl_packed"
        args = SFTConfig(**common, max_length=MAX_LEN, packing=packed, packing_strategy="bfd",
                         per_device_train_batch_size=prep["trl_rows_per_step"] if packed else BATCH,
                         train_sampling_strategy="random" if packed else "group_by_length")
        trainer = SFTTrainer(model=model, args=args, train_dataset=prep["trl"], processing_class=prep["tokenizer"],
                             callbacks=[Clock()])
        # TRL refuses a custom collator with padding-free batches: count around its own one instead.
        collator = trainer.data_collator = Counting(trainer.data_collator)
    else:
        grouped = method.startswith("ftflow_padded")
        args = TrainingArguments(**common, per_device_train_batch_size=BATCH, remove_unused_columns=False,
                                 train_sampling_strategy="group_by_length" if grouped else "random",
                                 length_column_name="length")
        if method == "seed":
            collator, data = Counting(default_data_collator), prep["seed"]
        elif "packed" in method:
            collator, data = Counting(PackedCollator()), prep["ftflow"]
        else:
            collator, data = Counting(PaddedCollator(pad_token_id=prep["pad"])), prep["ftflow"]
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()])

    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    # accelerate's loader collates one batch ahead: batches[1:] are the ones of steps 2..N.
    timed = collator.batches[1:]
    seconds = clock["t_end"] - clock["t1"]
    computed, real, trained = (sum(b[i] for b in timed) for i in range(3))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "train_wall_s": round(wall, 2),
        "timed_s": round(seconds, 3),
        "trained_tokens_per_s": trained / seconds,
        "tokens_per_s": computed / seconds,
        "real_tokens_per_s": real / seconds,
        "padding_share": 1 - real / computed,
        "trained_tokens_epoch": sum(b[2] for b in collator.batches),
        "train_loss_last3": sum(losses[-3:]) / len(losses[-3:]),
        "held_out_loss": held_out_loss(trainer.model, prep["held_out"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(conn, method, prep, threads):
    try:
        conn.send(run_method(method, prep, threads))
    except BaseException as err:  # report, never hang the parent
        import traceback

        conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]})
    finally:
        conn.close()


def in_fork(method: str, prep: dict, threads: int) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, method, prep, threads), daemon=True)
    p.start()
    child.close()
    out = parent.recv()
    p.join()
    return out


def check_varlen_exact(prep: dict) -> float:
    """Max |logit difference| of the varlen attention on a packed row vs sdpa one sample at a time."""
    import torch

    from tasks.collate import PackedCollator, register_packed_attention

    rows = [prep["ftflow"][i] for i in range(4)]
    batch = PackedCollator()(rows)
    ref_model = build_model(prep, "sdpa").eval()
    model = build_model(prep, register_packed_attention()).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        one = torch.cat([ref_model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    return float((packed - one).abs().max())


def collator_cost(prep: dict) -> dict:
    """Microseconds a batch of 8 costs each collator (median of 5 passes over the data)."""
    from tasks.collate import PackedCollator, PaddedCollator

    data = [prep["ftflow"][i] for i in range(len(prep["ftflow"]))]
    batches = [data[i:i + BATCH] for i in range(0, len(data), BATCH)]
    out = {}
    for name, c in (("padded", PaddedCollator(pad_token_id=prep["pad"])), ("packed", PackedCollator())):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for b in batches:
                c(b)
            times.append((time.perf_counter() - t) / len(batches) * 1e6)
        out[name] = round(statistics.median(times), 1)
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {ALL_METHODS}")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_SAMPLES} samples, 1 repeat, methods {','.join(QUICK_METHODS)} (a smoke run, not a measurement)")
    ap.add_argument("--gpu", action="store_true", help="only the GPU benchmark (skipped cleanly without CUDA)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {RESULTS} (train_quick.json with --quick, {GPU_RESULTS.name} with --gpu)")
    args = ap.parse_args(argv)
    if args.gpu:
        return gpu_main(args.out or GPU_RESULTS)
    args.out = args.out or (RESULTS.with_name("train_quick.json") if args.quick else RESULTS)
    if args.quick:
        args.samples, args.repeats, args.methods = QUICK_SAMPLES, 1, ",".join(QUICK_METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        ap.error(f"unknown --methods {sorted(unknown)}; choose from {ALL_METHODS}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the children are forked
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # The parent never starts torch's OpenMP pool: a child forked after a parallel op would hang in
    # its first parallel region. Each child sets its own thread count.
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-train-") as tmp:
        prep = prepare(args.samples, Path(tmp))
        import trl.trainer.sft_trainer  # noqa: F401  (imported before the fork, not timed in every child)

        runs: dict[str, list[dict]] = {m: [] for m in methods}
        extras = {"varlen_attention_max_abs_logit_diff": None, "collator_us_per_batch": None}
        for k in range(args.repeats):
            for m in methods:
                runs[m].append(in_fork(m, prep, args.threads))
            # written after every repeat, so a run cut short still leaves its figures
            write(args.out, summarize(args, prep, runs, extras, t_start, repeats_done=k + 1))
        extras["varlen_attention_max_abs_logit_diff"] = in_fork_value(check_varlen_exact, prep)
        extras["collator_us_per_batch"] = collator_cost(prep)
        result = summarize(args, prep, runs, extras, t_start, repeats_done=args.repeats)

    write(args.out, result)
    print(format_table(result))  # the benchmark's report is its output
    return 0


def summarize(args, prep: dict, runs: dict[str, list[dict]], extras: dict, t_start: float, repeats_done: int) -> dict:
    """Medians over the repeats done so far, ratios and goals."""
    import torch
    import transformers
    import trl

    results = {}
    for m, rs in runs.items():
        errors = [r for r in rs if "error" in r]
        if errors:
            results[m] = {"error": errors[0]["error"], "traceback": errors[0]["traceback"]}
            continue
        results[m] = {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]}
        results[m]["trained_tokens_per_s_runs"] = [round(r["trained_tokens_per_s"], 1) for r in rs]
    ok = {m: r for m, r in results.items() if "error" not in r}
    best = lambda prefix: max((r["trained_tokens_per_s"] for m, r in ok.items() if m.startswith(prefix)), default=None)  # noqa: E731
    ftflow_default = ok.get("ftflow_packed_varlen", {}).get("trained_tokens_per_s")  # the worker's batching=auto
    ftflow_best, seed_v, trl_v = best("ftflow"), best("seed"), best("trl")
    ratios = {
        "ftflow_best_vs_seed": ftflow_best / seed_v if ftflow_best and seed_v else None,
        "ftflow_best_vs_trl_best": ftflow_best / trl_v if ftflow_best and trl_v else None,
        "ftflow_worker_default_vs_seed": ftflow_default / seed_v if ftflow_default and seed_v else None,
        "ftflow_worker_default_vs_trl_best": ftflow_default / trl_v if ftflow_default and trl_v else None,
    }
    result = {
        "command": "python -m bench.bench_train" + (" --quick" if args.quick else f" --samples {args.samples} --repeats {args.repeats}"),
        "samples": args.samples, "repeats": args.repeats, "threads": args.threads, "max_length": MAX_LEN,
        "batch_samples": BATCH, "trl_packed_rows_per_step": prep["trl_rows_per_step"], "model": MODEL_SHAPE,
        "data": prep["data"], "methods": results,
        "ratios": {k: (round(v, 2) if v else None) for k, v in ratios.items()},
        "goals_met": {
            "ftflow >= 3x seed": bool(ratios["ftflow_best_vs_seed"] and ratios["ftflow_best_vs_seed"] >= 3),
            "ftflow >= 1.2x TRL best": bool(ratios["ftflow_best_vs_trl_best"] and ratios["ftflow_best_vs_trl_best"] >= 1.2),
        },
        **extras,
        "repeats_done": repeats_done,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "load_average": os.getloadavg(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    return result


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def in_fork_value(fn, prep):
    """Run fn(prep) in a forked child (torch threads are never started in the parent)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target(conn):
        try:
            conn.send(fn(prep))
        except BaseException as err:
            conn.send(f"{type(err).__name__}: {err}")
        conn.close()

    p = ctx.Process(target=target, args=(child,), daemon=True)
    p.start()
    child.close()
    out = parent.recv()
    p.join()
    return out


def format_table(r: dict) -> str:
    d = r["data"]
    lines = [f"{d['samples']} samples (median {d['median_len']}, p95 {d['p95_len']}, max {d['max_len']} tokens; "
             f"{100 * d['multi_turn_share']:.0f}% multi-turn), {d['trained_tokens']:,} trained tokens an epoch; "
             f"{r['threads']} threads, median of {r.get('repeats_done', r['repeats'])} of {r['repeats']} repeats; load average {r['load_average'][0]:.1f}", "",
             f"{'method':<22}{'trained tok/s':>14}{'total tok/s':>12}{'padding':>9}{'peak RSS MB':>12}"
             f"{'train loss':>11}{'held-out':>10}{'steps':>6}"]
    for m, x in r["methods"].items():
        if "error" in x:
            lines.append(f"{m:<22}  FAILED: {x['error'][:90]}")
            continue
        lines.append(f"{m:<22}{x['trained_tokens_per_s']:>14,.0f}{x['tokens_per_s']:>12,.0f}{100 * x['padding_share']:>8.0f}%"
                     f"{x['peak_rss_mb']:>12,.0f}{x['train_loss_last3']:>11.3f}{x['held_out_loss']:>10.3f}{x['steps']:>6.0f}")
    lines += ["", f"ratios: {r['ratios']}", f"goals: {r['goals_met']}",
              f"varlen attention vs one-by-one sdpa: max |logit diff| {r['varlen_attention_max_abs_logit_diff']}",
              f"collator cost, us per batch of {r['batch_samples']}: {r['collator_us_per_batch']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# GPU: a Qwen2.5-0.5B-shaped model, bf16, packed, MFU


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
        return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}, sum(len(f["input_ids"]) ** 2 for f in feats)

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
    raise SystemExit(main())
