"""Tokenization as the user waits: `ftflow tokenize` (cold and cache hit) vs seed 000's loop, each
in its own fresh process (a benchmark, not a test).

    python -m bench.bench_tokenize                      # 20,000 conversations, 5 repeats
    python -m bench.bench_tokenize --rows 10000 --repeats 3

Workload: `bench.workload` (log-normal lengths, median ~150 tokens, ~20% multi-turn), the embedded
tiny Qwen2's tokenizer (the demo's model, as a local folder), max_length 1024, longer samples
truncated (as the seed does). Every method is one command started from scratch and timed from
start to exit, interpreter start, imports and tokenizer load included:
- seed: `python -m bench.bench_tokenize seed ...`: seed 000's script (import transformers and
  torch, load the tokenizer, read the JSON, its `preprocess`: several tokenizer calls per message,
  every sample padded to max_len, one tensor at the end);
- cold: `ftflow tokenize CONFIG --json` into an empty state folder (`FTFLOW_HOME`), exactly what a
  user runs first: config validation, the data stage, the tokenizer load, the encode (in its child
  process on mimalloc when installed), labels, save, stats;
- cold_1thread: the same with `RAYON_NUM_THREADS=1`: the tokenizer on one thread, which is what
  the encode child ran before it set `TOKENIZERS_PARALLELISM` itself (it inherited the CLI's false);
- cold_glibc: the same with `FTFLOW_TOKENIZER_MALLOC=off`: the encode in the CLI's own process on
  glibc malloc (what runs where no mimalloc/jemalloc is installed);
- hit: `ftflow tokenize` again on the state folder a cold run just built.
Each repeat runs the methods in a fresh random order; figures are medians [min-max] over repeats,
ratios are taken per repeat. `startup` is the wall time outside the stage's own work (what the
process reports as its build/loop time), shown separately. Results: bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, fmt, host, load_line, load_verdict, product_env, python, run_timed, shuffled, spread

OUT = RESULTS / "tokenize.json"
SYSTEM = "You are a helpful assistant."
MAX_LEN = 1024
METHODS = ("seed", "cold", "cold_1thread", "cold_glibc", "hit")


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


def seed_main(jsonl: str, model_dir: str, max_len: int) -> int:
    """The seed's script in this (fresh) process; prints its loop time and real tokens as JSON."""
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t1 = time.perf_counter()
    rows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    # Seed data: ShareGPT-style `conversations` with from/value; its system prompt is fixed.
    sources = [[{"from": m["role"], "value": m["content"]} for m in r["messages"] if m["role"] != "system"] for r in rows]
    out = seed_preprocess(sources, tokenizer, max_len)
    t2 = time.perf_counter()
    sys.stdout.write(json.dumps({"load_s": t1 - t0, "work_s": t2 - t1, "samples": len(rows),
                                 "real_tokens": int(out["attention_mask"].sum())}) + "\n")
    return 0


def write_config(folder: Path, jsonl: Path, model_dir: str, max_len: int) -> Path:
    """A pipeline config whose data and tokenize sections are the workload's."""
    cfg = folder / "tokenize.yaml"
    cfg.write_text(f"# python -m bench.bench_tokenize: ftflow tokenize {cfg}\n"
                   f"name: bench-tokenize\nmodel:\n  name_or_path: {model_dir}\n"
                   f"data:\n  train:\n    - {jsonl}\n  eval_fraction: 0.0\n"
                   f"tokenize:\n  max_length: {max_len}\n  length_policy: truncate   # as the seed, which cuts at max_len\n",
                   encoding="utf-8")
    return cfg


def run_method(method: str, tmp: Path, cfg: Path, jsonl: Path, model_dir: str, max_len: int, k: int) -> dict:
    if method == "seed":
        r = run_timed([python(), "-m", "bench.bench_tokenize", "seed", str(jsonl), model_dir, str(max_len)],
                      env=product_env(), cwd=tmp)
        inner = json.loads(r["stdout"].strip().splitlines()[-1])
        # the tokenizer load counts as work, as in ftflow's build_seconds (which starts before its load)
        r.update(work_s=round(inner["load_s"] + inner["work_s"], 3), tokens=inner["real_tokens"], samples=inner["samples"])
    else:
        home = tmp / (f"home-{k}" if method in ("cold", "hit") else f"home-{k}-{method}")
        extra = {"FTFLOW_HOME": str(home)}
        if method == "cold_1thread":
            extra.update(RAYON_NUM_THREADS="1", RAYON_RS_NUM_CPUS="1")
        if method == "cold_glibc":
            extra.update(FTFLOW_TOKENIZER_MALLOC="off")
        if method != "hit" and home.exists():
            shutil.rmtree(home)
        r = run_timed([python(), "-m", "ftflow.cli", "tokenize", str(cfg), "--json"], env=product_env(**extra), cwd=tmp)
        out = json.loads(r["stdout"])
        if out["hit"] != (method == "hit"):
            raise RuntimeError(f"{method}: expected hit={method == 'hit'}, got {out['hit']} ({out['path']})")
        stats = out["stats"]
        # a hit's stats are the build's, read back: its own work is the whole (short) process
        r.update(work_s=r["wall_s"] if method == "hit" else stats["build_seconds"], tokens=stats["tokens"], samples=stats["samples"],
                 encoder=stats.get("encoder"), key=out["key"])
    r["startup_s"] = round(r["wall_s"] - r["work_s"], 3) if method != "hit" else None
    for noisy in ("stdout", "stderr"):
        r.pop(noisy)
    return r


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["seed"]:
        return seed_main(argv[1], argv[2], int(argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="generated conversations")
    ap.add_argument("--repeats", type=int, default=5, help="repeats (>= 3), each runs every method once in a random order")
    ap.add_argument("--seed", type=int, default=0, help="seed of the method order")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (a median and a spread need three)")
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoTokenizer

    from bench.workload import embedded_model_dir, generate, tokens_per_word

    model_dir = embedded_model_dir()
    rng = random.Random(args.seed)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    orders = []
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-tok-") as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "train.jsonl"
        generate(jsonl, args.rows, tokens_per_word(AutoTokenizer.from_pretrained(model_dir)))
        cfg = write_config(tmp, jsonl, model_dir, MAX_LEN)
        for k in range(args.repeats):
            order = shuffled([m for m in METHODS if m != "hit"], rng)
            # a hit needs its repeat's cold build first: it goes in a random slot after it
            order.insert(rng.randint(order.index("cold") + 1, len(order)), "hit")
            orders.append(order)
            for m in order:
                runs[m].append(run_method(m, tmp, cfg, jsonl, model_dir, MAX_LEN, k))
                print(f"  repeat {k + 1}/{args.repeats} {m:<13}{runs[m][-1]['wall_s']:>8.2f} s", file=sys.stderr, flush=True)
        mb = jsonl.stat().st_size / 2**20

    per = {m: [r["wall_s"] for r in runs[m]] for m in METHODS}
    ratios = {
        "cold_vs_seed": [round(s / c, 2) for s, c in zip(per["seed"], per["cold"])],
        # CPU seconds of each process tree (the encode child included): steadier than wall on a loaded host
        "cold_vs_seed_cpu": [round(s["cpu_s"] / c["cpu_s"], 2) for s, c in zip(runs["seed"], runs["cold"])],
        "cold_1thread_vs_cold": [round(c1 / c, 3) for c1, c in zip(per["cold_1thread"], per["cold"])],
        "cold_glibc_vs_cold": [round(g / c, 3) for g, c in zip(per["cold_glibc"], per["cold"])],
        "cold_vs_hit": [round(c / h, 1) for c, h in zip(per["cold"], per["hit"])],
    }
    verdict = load_verdict([r for m in METHODS for r in runs[m]])
    summary = {m: {"wall_s": spread(per[m]), "work_s": spread([r["work_s"] for r in runs[m]]),
                   "cpu_s": spread([r["cpu_s"] for r in runs[m]]),
                   "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs[m]], 1)} for m in METHODS}
    cold_vs_seed = spread(ratios["cold_vs_seed"], 2)
    hit = summary["hit"]["wall_s"]
    result = {
        "command": "python -m bench.bench_tokenize " + " ".join(argv),
        "rows": args.rows, "input_mb": round(mb, 1), "max_length": MAX_LEN, "repeats": args.repeats, "orders": orders,
        "tokens": runs["cold"][0]["tokens"], "seed_real_tokens": runs["seed"][0]["tokens"],
        "encoder": runs["cold"][0]["encoder"], "encoder_glibc": runs["cold_glibc"][0]["encoder"],
        "summary": summary, "ratios_per_repeat": ratios,
        "ratios": {k: spread(v, 3) for k, v in ratios.items()},
        "goals": {"cold >= 5x seed (median of per-repeat ratios)": cold_vs_seed["median"] >= 5,
                  "hit < 1 s (median)": hit["median"] < 1.0},
        "load": verdict, "host": host(), "out": str(args.out), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))  # the benchmark's report is its output
    return 0


def _verdict(r: dict, goal: str) -> str:
    v = "met" if r["goals"][goal] else "NOT met"
    return f"not judged, loaded host (this run: {v})" if r["load"]["loaded"] else v


def format_table(r: dict) -> str:
    names = {"seed": "seed 000 loop (own process)", "cold": "ftflow tokenize, cold", "cold_1thread":
             "  same, tokenizer on 1 thread", "cold_glibc": "  same, encode on glibc malloc", "hit": "ftflow tokenize, cache hit"}
    s = r["summary"]
    lines = [f"tokenize: {r['rows']:,} conversations ({r['input_mb']} MB), {r['tokens']:,} tokens, max_length "
             f"{r['max_length']}; {r['repeats']} repeats, random order; median [min-max]; encoder: {r['encoder']}",
             "",
             f"{'method':<30}{'wall s (as the user waits)':>30}{'of it start-up s':>20}{'CPU s':>20}{'peak RSS MB':>14}"]
    for m in METHODS:
        startup = "" if m == "hit" else fmt(spread([x["startup_s"] for x in r["runs"][m]]))
        lines.append(f"{names[m]:<30}{fmt(s[m]['wall_s']):>30}{startup:>20}{fmt(s[m]['cpu_s']):>20}"
                     f"{s[m]['peak_rss_mb']['median']:>14.0f}")
    q = r["ratios_per_repeat"]
    lines += ["",
              f"cold vs seed (wall): {fmt(r['ratios']['cold_vs_seed'])}x, per repeat {q['cold_vs_seed']}   [goal >= 5x: "
              f"{_verdict(r, 'cold >= 5x seed (median of per-repeat ratios)')}]",
              f"cold vs seed (CPU seconds of the process tree): {fmt(r['ratios']['cold_vs_seed_cpu'])}x, per repeat "
              f"{q['cold_vs_seed_cpu']}",
              f"cache hit: {fmt(s['hit']['wall_s'])} s, cold/hit {fmt(r['ratios']['cold_vs_hit'], digits=1)}x   [goal < 1 s: "
              f"{_verdict(r, 'hit < 1 s (median)')}]",
              f"tokenizer on 1 thread / threads on: {fmt(r['ratios']['cold_1thread_vs_cold'])}x wall, per repeat "
              f"{q['cold_1thread_vs_cold']}",
              f"encode on glibc in process / on mimalloc child: {fmt(r['ratios']['cold_glibc_vs_cold'])}x wall, per repeat "
              f"{q['cold_glibc_vs_cold']}",
              load_line(r["load"]),
              f"written to {r['out']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
