"""Tokenization throughput: the seed's per-message loop vs ftflow cold build vs ftflow cache hit
(a benchmark, not a test).

    python -m bench.bench_tokenize               # 20,000 generated conversations
    python -m bench.bench_tokenize --rows 5000

All three tokenize the same generated canonical JSONL with the embedded tiny Qwen2 ChatML
tokenizer, longer samples truncated (as the seed does). Default workload: issue #8's (the one
bench_train uses: log-normal lengths, median ~150 tokens, tail to ~1,000, ~20% multi-turn),
max_length 1024; `--workload uniform` is the older one (3-60 word prompts, 1-150 word replies,
max_length 512). Seed runs and cold builds are interleaved, each figure a median of repeats:
1. seed: seed 000's `preprocess` (Qwen finetune.py), reimplemented faithfully: several tokenizer
   calls per message, every sample padded to max_len, one big tensor at the end;
2. cold: `tokenize_dataset` into an empty cache (render, batched encode, labels, save_to_disk,
   stats), as ftflow runs it: the encode in a child process on mimalloc/jemalloc when one is
   installed (`tasks.encode_process`);
3. cold, in process: the same with `FTFLOW_TOKENIZER_MALLOC=off` (the encode on this process's
   glibc malloc), side by side, so the allocator's share is measured, not assumed;
4. hit: `tokenize_dataset` again (hash the inputs, read stats.json back);
and, for scale, the Rust tokenizer alone on the rendered texts: a floor every method pays.
Imports and the tokenizer's first load are warmed up on a small file first, for every method.
Results go to bench/results/tokenize.json. Goals: cold >= 5x seed, hit >= 20x faster than cold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "tokenize.json"
WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver winter button dragon "
    "pencil mirror castle orange rabbit window bridge planet coffee violin desert marble jacket island"
).split() + list("床前明月光疑是地上霜春眠不觉晓处处闻啼鸟") + ["🙂", "。", "，", "?", "!"]
SYSTEM = "You are a helpful assistant."
MAX_LEN = 512


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Canonical JSONL: user prompts of 3-60 words, replies of 1-150 words, ~20% with 2-4 turns."""
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            turns = rng.randint(2, 4) if rng.random() < 0.2 else 1
            messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
            for _ in range(turns):
                messages += [{"role": "user", "content": text(3, 60)}, {"role": "assistant", "content": text(1, 150)}]
            f.write(json.dumps({"id": f"bench-{i}", "messages": messages, "source": "bench"}, ensure_ascii=False) + "\n")


def seed_preprocess(sources, tokenizer, max_len: int, system_message: str = SYSTEM) -> dict:
    """Seed 000's `preprocess`, line for line (Qwen-1's `tokenizer.im_start_id` looked up by name)."""
    import torch

    IGNORE_TOKEN_ID = -100
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}

    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens

    input_ids, targets = [], []
    for i, source in enumerate(sources):
        if roles[source[0]["from"]] != roles["user"]:
            source = source[1:]

        input_id, target = [], []
        system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
        input_id += system
        target += [im_start] + [IGNORE_TOKEN_ID] * (len(system) - 3) + [im_end] + nl_tokens
        assert len(input_id) == len(target)
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + \
                tokenizer(sentence["value"]).input_ids + [im_end] + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>user":
                _target = [im_start] + [IGNORE_TOKEN_ID] * (len(_input_id) - 3) + [im_end] + nl_tokens
            elif role == "<|im_start|>assistant":
                _target = [im_start] + [IGNORE_TOKEN_ID] * len(tokenizer(role).input_ids) + \
                    _input_id[len(tokenizer(role).input_ids) + 1:-2] + [im_end] + nl_tokens
            else:
                raise NotImplementedError
            target += _target
        assert len(input_id) == len(target)
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [IGNORE_TOKEN_ID] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    input_ids = torch.tensor(input_ids, dtype=torch.int)
    targets = torch.tensor(targets, dtype=torch.int)

    return dict(input_ids=input_ids, labels=targets, attention_mask=input_ids.ne(tokenizer.pad_token_id))


def run_seed(jsonl: Path, tokenizer, max_len: int = MAX_LEN) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and real (non-pad) tokens of reading the file + the seed loop."""
    t0, c0 = time.perf_counter(), time.process_time()
    rows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    # Seed data: ShareGPT-style `conversations` with from/value; its system prompt is fixed.
    sources = [[{"from": m["role"], "value": m["content"]} for m in r["messages"] if m["role"] != "system"] for r in rows]
    out = seed_preprocess(sources, tokenizer, max_len)
    return time.perf_counter() - t0, time.process_time() - c0, int(out["attention_mask"].sum())


def run_ftflow(jsonl: Path, model_dir: str, cache_root: Path, max_len: int = MAX_LEN, malloc: str = "auto"):
    """Wall seconds, CPU seconds (this process's threads and the encode child) and the
    TokenizeResult of one call; `malloc` is FTFLOW_TOKENIZER_MALLOC for the call."""
    import resource

    from tasks.encode_process import ENV
    from tasks.tokenize import tokenize_dataset

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    before = os.environ.get(ENV)
    os.environ[ENV] = malloc
    try:
        t0, c0 = time.perf_counter(), cpu()
        # truncate, like the seed (which cuts every sample at max_len), so both keep the same rows.
        result = tokenize_dataset(jsonl, model_dir, cache_root=cache_root, max_length=max_len, length_policy="truncate")
        return time.perf_counter() - t0, cpu() - c0, result
    finally:
        if before is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = before


def tokenizer_floor(jsonl: Path, tokenizer) -> tuple[float, float]:
    """Wall and CPU seconds of the Rust tokenizer alone on the rendered texts (one batched call,
    no offsets, all cores): what any implementation with this tokenizer pays, the seed loop included."""
    rows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return time.perf_counter() - t0, time.process_time() - c0


def _same_dataset(a: Path, b: Path) -> bool:
    from datasets import load_from_disk

    return load_from_disk(str(a)).data.table.equals(load_from_disk(str(b)).data.table)


def generate_sft(path: Path, rows: int, tokenizer, seed: int = 0) -> None:
    """Issue #8's workload (shared with bench_train): log-normal lengths, median ~150 tokens, tail
    to ~1,000, ~20% multi-turn, 30% with a system prompt."""
    from bench.bench_train import WORDS as TRAIN_WORDS, generate as generate_train

    probe = " ".join(random.Random(0).choices(TRAIN_WORDS, k=2000))
    generate_train(path, rows, len(tokenizer(probe).input_ids) / 2000, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="generated conversations")
    parser.add_argument("--repeats", type=int, default=3, help="seed runs and cold builds (interleaved) to take the median of")
    parser.add_argument("--workload", choices=("sft", "uniform"), default="sft",
                        help="sft: issue #8's log-normal SFT lengths, max_length 1024 (default); "
                             "uniform: 3-60 word prompts, 1-150 word replies, max_length 512")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    from tasks.base_model import resolve_model_path

    model_dir = resolve_model_path("embedded:tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len = 1024 if args.workload == "sft" else MAX_LEN
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-tok-") as tmp:
        tmp = Path(tmp)
        jsonl, warm = tmp / "bench.jsonl", tmp / "warm.jsonl"
        if args.workload == "sft":
            generate_sft(jsonl, args.rows, tokenizer)
            generate_sft(warm, 200, tokenizer, seed=1)
        else:
            generate(jsonl, args.rows)
            generate(warm, 200, seed=1)
        run_seed(warm, tokenizer, max_len)
        run_ftflow(warm, model_dir, tmp / "warm-cache", max_len)

        seeds, cold, inproc = [], [], []
        for k in range(args.repeats):  # interleaved, so a load spike hits every method alike
            seeds.append(run_seed(jsonl, tokenizer, max_len))
            cold.append(run_ftflow(jsonl, model_dir, tmp / f"cache-{k}", max_len))
            inproc.append(run_ftflow(jsonl, model_dir, tmp / f"cache-inproc-{k}", max_len, malloc="off"))
        seed_tokens = seeds[0][2]
        seed_s, seed_cpu = statistics.median(w for w, _, _ in seeds), statistics.median(c for _, c, _ in seeds)
        per_repeat = [round(s_[0] / c_[0], 2) for s_, c_ in zip(seeds, cold)]
        assert not any(r.hit for _, _, r in cold + inproc)
        encoder = cold[0][2].stats["encoder"]
        same = _same_dataset(cold[0][2].path, inproc[0][2].path)
        hits = [run_ftflow(jsonl, model_dir, tmp / "cache-0", max_len) for _ in range(max(args.repeats, 5))]
        assert all(r.hit for _, _, r in hits)
        floor_s, floor_cpu = tokenizer_floor(jsonl, tokenizer)
        stats = cold[0][2].stats
        cold_s, cold_cpu = statistics.median(w for w, _, _ in cold), statistics.median(c for _, c, _ in cold)
        hit_s, hit_cpu = statistics.median(w for w, _, _ in hits), statistics.median(c for _, c, _ in hits)
        inproc_s, inproc_cpu = statistics.median(w for w, _, _ in inproc), statistics.median(c for _, c, _ in inproc)

    tokens = stats["tokens"]
    table = [  # (name, wall s, cpu s, tokens)
        ("seed", "seed 000 preprocess loop", seed_s, seed_cpu, seed_tokens),
        ("cold", "ftflow cold build", cold_s, cold_cpu, tokens),
        ("cold_in_process", "  (encode in process)", inproc_s, inproc_cpu, tokens),
        ("hit", "ftflow cache hit", hit_s, hit_cpu, tokens),
        ("tokenizer_floor", "(tokenizer alone, here)", floor_s, floor_cpu, tokens),
    ]
    result = {
        "rows": args.rows,
        "workload": args.workload,
        "max_length": max_len,
        "repeats": args.repeats,
        "cold_vs_seed_per_repeat": per_repeat,
        "encoder": encoder,
        "cold_vs_in_process": round(inproc_s / cold_s, 2),
        "same_dataset_both_encoders": same,
        "samples_kept": stats["samples"],
        "samples_truncated": stats["truncated"],
        "tokens": tokens,
        "seed_real_tokens": seed_tokens,
        "wall_seconds": {key: round(w, 4) for key, _, w, _, _ in table},
        "cpu_seconds": {key: round(c, 4) for key, _, _, c, _ in table},
        "rows_per_s": {key: round(args.rows / w, 1) for key, _, w, _, _ in table},
        "tokens_per_s": {key: round(n / w, 1) for key, _, w, _, n in table},
        "cold_vs_seed": {"wall": round(seed_s / cold_s, 2), "cpu": round(seed_cpu / cold_cpu, 2)},
        "hit_vs_cold": {"wall": round(cold_s / hit_s, 1), "cpu": round(cold_cpu / max(hit_cpu, 1e-6), 1)},
        "cold_share_in_tokenizer": {"wall": round(floor_s / cold_s, 2), "cpu": round(floor_cpu / cold_cpu, 2)},
        "goals_met": {"cold_vs_seed >= 5": seed_s / cold_s >= 5, "hit_vs_cold >= 20": cold_s / hit_s >= 20},
        "load_average": os.getloadavg(),
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"{args.rows:,} conversations ({args.workload} workload, ~20% multi-turn), {tokens:,} tokens, "
             f"max_length {max_len}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
             f"median of {args.repeats} interleaved repeats", "",
             f"{'method':<26}{'wall s':>9}{'cpu s':>9}{'rows/s':>12}{'tokens/s':>14}{'x seed (wall/cpu)':>20}"]
    for _, name, w, c, n in table:
        lines.append(f"{name:<26}{w:>9.3f}{c:>9.3f}{args.rows / w:>12,.0f}{n / w:>14,.0f}"
                     f"{seed_s / w:>12.1f} / {seed_cpu / max(c, 1e-6):.1f}")
    lines += ["", f"cold vs seed: {result['cold_vs_seed']} (goal >= 5; per repeat, wall: {per_repeat}); hit vs cold: {result['hit_vs_cold']} (goal >= 20)",
              f"encoder: {encoder}; {result['cold_vs_in_process']}x the in-process encode, "
              f"datasets identical: {same}",
              f"share of the cold build spent inside the Rust tokenizer (this process): {result['cold_share_in_tokenizer']}",
              f"written to {args.out}"]
    print("\n".join(lines))  # the benchmark's report is its output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
