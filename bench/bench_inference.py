"""Scoring throughput: seed 004's one-prompt-at-a-time loop vs ftflow's `tasks.evaluate.generate_batch`,
each in its own fresh process, on replies of varied lengths (a benchmark, not a test).

    python -m bench.bench_inference                          # demo eval prompts, noisy tiny model, 3 repeats
    python -m bench.bench_inference --max-new-tokens 32 --repeats 5
    python -m bench.bench_inference --model PATH --noise 0   # a trained model folder as it is

The model: the embedded tiny Qwen2 with its weights re-drawn from N(0, 0.3) (seed 1; the trick of
tests/conftest.py's `noisy_model_dir`), saved once. The random-init model repeats one token to
`max_new_tokens` for every prompt, batching's best case with a trivial equality check; the noisy
one gives replies that differ per prompt and whose lengths vary, some stopping early at the
end-of-turn token, so a batch waits for its longest reply as it would with a trained model.
Both methods decode greedily with the same stop ids and must produce the same replies (the
benchmark fails otherwise). Each method is a fresh process timed from start to exit (imports and
the model load included, reported separately as start-up); the methods run in a random order
each repeat; medians [min-max], ratios per repeat. Results: bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from bench.common import RESULTS, fmt, host, load_line, load_verdict, product_env, python, run_timed, shuffled, spread

OUT = RESULTS / "inference.json"
DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "reverse_eval.jsonl"
METHODS = ("seed_loop", "generate_batch")


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


def run_one(method: str, model_dir: str, data: str, max_new_tokens: int, batch_size: int, max_samples: int | None,
            out: str) -> int:
    """One method in this (fresh) process; writes its replies and its own loop time."""
    t0 = time.perf_counter()
    from tasks.evaluate import generate_batch, load_for_inference, read_eval_jsonl, stop_token_ids

    model, tokenizer, _ = load_for_inference(model_dir)
    prompts = [r["messages"][:-1] for r in read_eval_jsonl(data, max_samples)]
    t1 = time.perf_counter()
    if method == "seed_loop":
        replies = seed_loop(model, tokenizer, prompts, max_new_tokens, stop_token_ids(model, tokenizer))
        new_tokens = [len(tokenizer(r, add_special_tokens=False).input_ids) for r in replies]
        stopped = None
    else:
        res = generate_batch(model, tokenizer, prompts, {"max_new_tokens": max_new_tokens}, batch_size)
        replies = [r["prediction"] for r in res]
        new_tokens, stopped = [r["new_tokens"] for r in res], [r["stopped"] for r in res]
    t2 = time.perf_counter()
    Path(out).write_text(json.dumps({"startup_s": t1 - t0, "loop_s": t2 - t1, "replies": replies,
                                     "new_tokens": new_tokens, "stopped": stopped}))
    return 0


_EVAL_CHILD = """
import json, resource, sys, time
from tasks.evaluate import evaluate_model, load_for_inference
model, data, batch_size, max_new_tokens, max_samples, load_only = sys.argv[1:7]
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


def eval_peak_rss(model: str, data: str, batch_size: int, max_new_tokens: int, max_samples: int | None) -> dict:
    """Peak RSS (MB) of the product's eval path (`evaluate_model`: generation, scores and the
    teacher-forced loss) in a fresh process, beside a process that only loads the model (the
    difference is what evaluation itself holds). On the real vocabulary (issue 16, 151,665 tokens):
    `python -m bench.bench_inference --model DIR --batch-size 25 --max-new-tokens 4` with DIR from
    `tests/realvocab.py`'s `real_tiny_model_dir`."""
    import subprocess

    res = {}
    for key, load_only in (("load_only", "1"), ("evaluate_model", "0")):
        proc = subprocess.run(
            [python(), "-c", _EVAL_CHILD, model, data, str(batch_size), str(max_new_tokens),
             str(max_samples) if max_samples else "-", load_only],
            cwd=Path(__file__).resolve().parent.parent, env=product_env(), capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"eval child ({key}) failed:\n{proc.stderr[-3000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("EVAL_CHILD "))
        res[key] = {k: round(v, 4) for k, v in json.loads(line[len("EVAL_CHILD "):]).items()}
    res["eval_over_load_mb"] = round(res["evaluate_model"]["peak_rss_mb"] - res["load_only"]["peak_rss_mb"], 1)
    return res


def noisy_model(noise: float, folder: Path) -> str:
    """The embedded tiny model, weights re-drawn from N(0, noise) except norms (seed 1), saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.workload import embedded_model_dir

    base = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, noise)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_run"]:
        m, model_dir, data, mnt, bs, n, out = argv[1:8]
        return run_one(m, model_dir, data, int(mnt), int(bs), int(n) or None, out)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model folder (default: the noisy embedded tiny model)")
    ap.add_argument("--noise", type=float, default=0.3, help="std of the re-drawn weights of the default model")
    ap.add_argument("--data", default=str(DEMO), help="canonical eval JSONL (the last message of each row is the reference)")
    ap.add_argument("--max-samples", type=int, default=None, help="the first N prompts only")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="repeats (>= 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the method order")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (a median and a spread need three)")

    import tempfile

    rng = random.Random(args.seed)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    replies: dict[str, list[list[str]]] = {m: [] for m in METHODS}
    orders = []
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-inf-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model or noisy_model(args.noise, tmp / "model")
        for k in range(args.repeats):
            order = shuffled(list(METHODS), rng)
            orders.append(order)
            for m in order:
                out = tmp / f"{m}-{k}.json"
                r = run_timed([python(), "-m", "bench.bench_inference", "_run", m, model_dir, args.data,
                               str(args.max_new_tokens), str(args.batch_size), str(args.max_samples or 0), str(out)], env=product_env(), cwd=tmp)
                inner = json.loads(out.read_text())
                r.update(startup_s=round(r["wall_s"] - inner["loop_s"], 3), loop_s=round(inner["loop_s"], 3))
                r.pop("stdout"), r.pop("stderr")
                runs[m].append(r)
                replies[m].append(inner["replies"])
                if m == "generate_batch":
                    new_tokens, stopped = inner["new_tokens"], inner["stopped"]
                print(f"  repeat {k + 1}/{args.repeats} {m:<15}{r['wall_s']:>8.2f} s", file=sys.stderr, flush=True)
        eval_rss = eval_peak_rss(model_dir, args.data, args.batch_size, args.max_new_tokens, args.max_samples)

    reference = replies["generate_batch"][0]
    all_replies = [x for m in METHODS for x in replies[m]]
    mismatches = sorted({i for x in all_replies for i, (a, b) in enumerate(zip(x, reference)) if a != b})
    per = {m: {key: [r[key] for r in runs[m]] for key in ("wall_s", "loop_s", "startup_s", "peak_rss_mb")} for m in METHODS}
    ratios = {"wall": [round(s / b, 2) for s, b in zip(per["seed_loop"]["wall_s"], per["generate_batch"]["wall_s"])],
              "loop": [round(s / b, 2) for s, b in zip(per["seed_loop"]["loop_s"], per["generate_batch"]["loop_s"])]}
    lengths = sorted(new_tokens)
    result = {
        "command": "python -m bench.bench_inference " + " ".join(argv),
        "model": args.model or f"embedded tiny-qwen2, weights N(0, {args.noise}) (seed 1)", "data": args.data,
        "n": len(reference), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "repeats": args.repeats, "orders": orders,
        "replies": {"distinct": len(set(reference)), "stopped_early": sum(stopped),
                    "new_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}},
        "outputs_equal": not mismatches, "mismatched_indices": mismatches[:20],
        "summary": {m: {k: spread(v) for k, v in per[m].items()} for m in METHODS},
        "ratios_per_repeat": ratios, "ratios": {k: spread(v, 2) for k, v in ratios.items()},
        "eval_peak_rss": eval_rss,
        "load": load_verdict([r for m in METHODS for r in runs[m]]), "host": host(), "out": str(args.out), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))  # the benchmark's report is its output
    return 0 if not mismatches else 1


def format_table(r: dict) -> str:
    rep = r["replies"]
    lines = [f"inference: {r['n']} prompts, greedy, max_new_tokens {r['max_new_tokens']}, {r['model']}; replies: "
             f"{rep['distinct']} distinct, {rep['stopped_early']} stopped early, new tokens min/median/max "
             f"{rep['new_tokens']['min']}/{rep['new_tokens']['median']}/{rep['new_tokens']['max']}; "
             f"{r['repeats']} repeats in random order; median [min-max]", "",
             f"{'method':<32}{'wall s':>26}{'loop s':>26}{'start-up s':>22}"]
    names = {"seed_loop": "seed 004 loop (one at a time)", "generate_batch": f"generate_batch (bs={r['batch_size']})"}
    for m, s in r["summary"].items():
        lines.append(f"{names[m]:<32}{fmt(s['wall_s']):>26}{fmt(s['loop_s']):>26}{fmt(s['startup_s']):>22}")
    lines += ["",
              f"batched vs seed loop: wall {fmt(r['ratios']['wall'])}x (per repeat {r['ratios_per_repeat']['wall']}); "
              f"loop alone {fmt(r['ratios']['loop'])}x (per repeat {r['ratios_per_repeat']['loop']})",
              f"outputs equal (every run of both methods): {r['outputs_equal']}"
              + (f", mismatches at {r['mismatched_indices']}" if not r["outputs_equal"] else ""),
              f"product eval path (evaluate_model, fresh process): peak RSS {r['eval_peak_rss']['evaluate_model']['peak_rss_mb']:.0f} MB "
              f"(model load alone {r['eval_peak_rss']['load_only']['peak_rss_mb']:.0f} MB)",
              load_line(r["load"]), f"written to {r['out']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
