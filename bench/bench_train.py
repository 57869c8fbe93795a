"""Training as each method's users launch it: the seed recipe, TRL's SFTTrainer and ftflow's train
stage, on the same 2 ranks with the same DeepSpeed ZeRO-3 config (a benchmark, not a test).

    python -m bench.bench_train                       # 1,024 samples, 3 repeats, every method
    python -m bench.bench_train --samples 128         # what `python -m bench --quick` runs
    python -m bench.bench_train --methods seed,ftflow --repeats 5
    python -m bench.bench_train --methods ftflow --baseline 372304c^1   # vs the train stage of another commit

Same for every method: the model (a 4-layer, 256-wide Qwen2 with the embedded tiny-qwen2's
tokenizer, saved once with a fixed init; every method loads that folder), the data (`bench.workload`:
log-normal lengths, median ~150 tokens, ~20% multi-turn, max_length 1024), one epoch of the same
samples, 16 samples a step (8 per rank x 2 ranks; TRL's packed rows hold as many tokens), AdamW,
lr 5e-4, cosine with 3% warm-up, clipping 1.0, seed 0, fp32, `configs/deepspeed/zero3.json` with
its batch sizes filled the way ftflow fills them, 2 ranks over gloo, OMP_NUM_THREADS = cores / 2.
Methods, each a fresh command timed from start to exit:
- seed: seed 000's recipe: its `preprocess` (every sample padded to max_length; tokenized before,
  in the bench, since tokenization is timed in bench_tokenize), HF Trainer, default collator,
  launched by torchrun;
- trl_packed: TRL `SFTTrainer`, packing="bfd" (padding-free rows of max_length, position ids
  restarting per sample), assistant-only loss, launched by torchrun;
- trl_grouped: TRL `SFTTrainer` without packing, length-grouped batches, assistant-only loss;
- ftflow: `tasks.train.run_training` (what `ftflow run` calls): torchrun, `tasks/train_worker.py`,
  batching=auto, checkpoints with completion markers, the final ZeRO checkpoint.
- ftflow_base (with `--baseline REV`): the same, from the source of commit REV (`git archive`,
  run with that tree first on the path), to check that a change of the train stage does not
  regress it; ratios `ftflow_vs_ftflow_base` come per repeat, side by side in one run.
Every method ends with a final ZeRO checkpoint; the bench gathers each with the consolidate stage's
`trained_state_dict` and computes the held-out loss (per trained token, 32 other samples) with one
function, so the losses are comparable. Figures: trained tokens/s over the process wall time and
over the training loop alone (the Trainer's train_runtime), held-out loss, peak RSS summed over the
launcher and all ranks. Each repeat runs the methods in a fresh random order; medians [min-max],
ratios per repeat. Results: bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, build_deepspeed_ops, fmt, host, load_line, load_verdict, product_env, python, run_timed, shuffled, spread

OUT = RESULTS / "train.json"
MAX_LEN = 1024
MICRO = 8  # samples per rank per step (x 2 ranks = 16 a step)
RANKS = 2
HELD_OUT = 32
METHODS = ("seed", "trl_packed", "trl_grouped", "ftflow")
SCHEDULE = dict(learning_rate=5e-4, lr_scheduler="cosine", warmup_ratio=0.03, max_grad_norm=1.0, seed=0)
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------
# set-up (in the bench process, not timed)


def prepare(samples: int, tmp: Path) -> dict:
    """The model folder and every method's dataset on disk."""
    import torch
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bench.bench_tokenize import seed_preprocess
    from bench.workload import embedded_model_dir, generate, tokens_per_word
    from tasks.tokenize import tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model_dir = tmp / "model"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      **MODEL_SHAPE)
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    per_word = tokens_per_word(tokenizer)
    train_jsonl, held_jsonl = tmp / "train.jsonl", tmp / "held_out.jsonl"
    generate(train_jsonl, samples, per_word, seed=0)
    generate(held_jsonl, HELD_OUT, per_word, seed=1)
    tok = lambda p: tokenize_dataset(p, str(model_dir), cache_root=tmp / "cache", max_length=MAX_LEN,  # noqa: E731
                                     length_policy="truncate")
    train_r, held_r = tok(train_jsonl), tok(held_jsonl)
    train = load_from_disk(str(train_r.path))

    rows = [json.loads(line) for line in open(train_jsonl, encoding="utf-8")]
    sources = [[{"from": m["role"], "value": m["content"]} for m in r["messages"] if m["role"] != "system"] for r in rows]
    seed = seed_preprocess(sources, tokenizer, MAX_LEN)
    Dataset.from_dict({"input_ids": seed["input_ids"].long().tolist(), "labels": seed["labels"].long().tolist(),
                       "attention_mask": seed["attention_mask"].long().tolist()}).save_to_disk(str(tmp / "data-seed"))
    Dataset.from_dict({"input_ids": train["input_ids"],
                       "assistant_masks": [[int(x != -100) for x in lab] for lab in train["labels"]]}
                      ).save_to_disk(str(tmp / "data-trl"))
    lengths = train["length"]
    mean_len = sum(lengths) / len(lengths)
    trained = sum(sum(x != -100 for x in lab) for lab in train["labels"])
    seed_trained = int((seed["labels"] != -100).sum())
    return {
        "model_dir": str(model_dir), "pad": tokenizer.pad_token_id,
        "datasets": {"seed": str(tmp / "data-seed"), "trl_packed": str(tmp / "data-trl"),
                     "trl_grouped": str(tmp / "data-trl"), "ftflow": str(train_r.path)},
        "held_out": str(held_r.path),
        # TRL's packed rows are max_length long: as many rows a step as hold ~MICRO samples' tokens
        "trl_rows_per_rank": max(1, round(MICRO * mean_len / MAX_LEN)),
        "trained_tokens": {"seed": seed_trained, "trl_packed": trained, "trl_grouped": trained, "ftflow": trained},
        "data": {"samples": len(lengths), "tokens": sum(lengths), "median_len": sorted(lengths)[len(lengths) // 2],
                 "max_len": max(lengths), "trained_tokens": trained, "seed_computed_tokens": len(lengths) * MAX_LEN},
    }


def deepspeed_config(micro: int) -> dict:
    """configs/deepspeed/zero3.json with its batch sizes filled as ftflow fills them."""
    from tasks.train import load_deepspeed_config
    from tasks.train_worker import fill_deepspeed_config

    return fill_deepspeed_config(load_deepspeed_config("configs/deepspeed/zero3.json"),
                                 {"micro_batch_size": micro, "grad_accum": 1, "max_grad_norm": SCHEDULE["max_grad_norm"],
                                  "precision": "fp32"}, RANKS)


# ---------------------------------------------------------------------------------------------
# the methods' commands


def command(method: str, spec_path: Path) -> tuple[list[str], dict[str, str]]:
    env = product_env(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // RANKS)), PYTHONUNBUFFERED="1",
                      TOKENIZERS_PARALLELISM="false")
    if method == "ftflow":
        return [python(), "-m", "bench.bench_train", "_ftflow", str(spec_path)], env
    if method == "ftflow_base":  # the other commit's tree first on the path: its bench entry, tasks and worker
        src = json.loads(spec_path.read_text())["baseline_src"]
        env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]])
        return [python(), "-m", "bench.bench_train", "_ftflow", str(spec_path)], env
    # as the seeds and TRL's docs launch: torchrun, the same flags ftflow's launcher passes
    return [python(), "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}", "--standalone",
            "--module", "bench.bench_train", "_hf", str(spec_path)], env


def hf_rank(spec: dict) -> int:
    """One rank of the seed recipe or a TRL SFTTrainer run (under torchrun)."""
    import deepspeed
    import torch.distributed as dist
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    deepspeed.init_distributed(dist_backend="gloo")  # before the model: zero.Init partitions it as it loads
    method, out = spec["method"], Path(spec["out"])
    common = dict(output_dir=str(out / "checkpoints"), num_train_epochs=1, learning_rate=SCHEDULE["learning_rate"],
                  lr_scheduler_type=SCHEDULE["lr_scheduler"], warmup_steps=SCHEDULE["warmup_ratio"],
                  max_grad_norm=SCHEDULE["max_grad_norm"], optim="adamw_torch", logging_steps=25, save_strategy="no",
                  report_to="none", seed=SCHEDULE["seed"], data_seed=SCHEDULE["seed"], use_cpu=True, ddp_backend="gloo",
                  dataloader_num_workers=0, disable_tqdm=True, deepspeed=spec["deepspeed"],
                  per_device_train_batch_size=spec["micro"], bf16=False, fp16=False)  # fp32, as ftflow's default
                  # (TRL's SFTConfig defaults to bf16=True)
    data = load_from_disk(spec["dataset"])
    if method == "seed":
        args = TrainingArguments(**common)  # before the model: it turns on ZeRO-3's partitioned load
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    else:
        from trl import SFTConfig, SFTTrainer

        packed = method == "trl_packed"
        args = SFTConfig(**common, max_length=MAX_LEN, packing=packed, packing_strategy="bfd",
                         train_sampling_strategy="random" if packed else "group_by_length")
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
        trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]))
    result = trainer.train()
    trainer.model_wrapped.save_checkpoint(str(out / "final"), tag="final")
    dist.barrier()
    if dist.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps({"train_runtime_s": result.metrics["train_runtime"],
                                                      "steps": trainer.state.global_step,
                                                      "train_loss": result.training_loss}))
    return 0


def ftflow_process(spec: dict) -> int:
    """ftflow's train stage as `ftflow run` calls it: run_training launches torchrun and the worker."""
    from ftflow.config import TrainConfig
    from tasks.train import run_training

    logging.basicConfig(level=logging.WARNING)
    train = TrainConfig(deepspeed="configs/deepspeed/zero3.json", nproc_per_node=RANKS, epochs=1, micro_batch_size=MICRO,
                        learning_rate=SCHEDULE["learning_rate"], lr_scheduler=SCHEDULE["lr_scheduler"],
                        warmup_ratio=SCHEDULE["warmup_ratio"], max_grad_norm=SCHEDULE["max_grad_norm"],
                        seed=SCHEDULE["seed"], batching="auto", save_steps=200, logging_steps=25)
    out = Path(spec["out"])
    s = run_training(train=train, train_dir=out / "ftflow", model_path=spec["model_dir"], dataset_path=spec["dataset"],
                     pad_token_id=spec["pad"])
    (out / "summary.json").write_text(json.dumps({"train_runtime_s": s["train_runtime_s"], "steps": s["global_step"],
                                                  "train_loss": s["train_loss"], "final_dir": s["final_dir"]}))
    return 0


# ---------------------------------------------------------------------------------------------
# measuring


def held_out_loss(model_dir: str, final_dir: Path, held_out: str) -> float:
    """Mean cross-entropy per trained token of the held-out samples (one at a time, no padding),
    with the weights gathered from a ZeRO checkpoint by the consolidate stage's own reader."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from tasks.consolidate import materialise, trained_state_dict

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    missing, unexpected = model.load_state_dict(materialise(trained_state_dict(final_dir)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{final_dir}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in load_from_disk(held_out):
            labels = torch.tensor([r["labels"]])
            k = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([r["input_ids"]]), labels=labels).loss) * k
            n += k
    return total / n


def run_method(method: str, prep: dict, tmp: Path, k: int) -> dict:
    out = tmp / f"{method}-{k}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    micro = prep["trl_rows_per_rank"] if method == "trl_packed" else MICRO
    data_of = "ftflow" if method == "ftflow_base" else method
    spec = {"method": method, "out": str(out), "model_dir": prep["model_dir"], "dataset": prep["datasets"][data_of],
            "pad": prep["pad"], "micro": micro, "deepspeed": deepspeed_config(micro), "baseline_src": prep.get("baseline_src")}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd, env = command(method, spec_path)
    r = run_timed(cmd, env=env, cwd=Path(prep["baseline_src"]) if method == "ftflow_base" else tmp, timeout=3600)
    s = json.loads((out / "summary.json").read_text())
    final = Path(s["final_dir"]) if method.startswith("ftflow") else out / "final"
    trained = prep["trained_tokens"][data_of]
    r.update(steps=s["steps"], train_loss=round(s["train_loss"], 4), train_runtime_s=round(s["train_runtime_s"], 2),
             trained_tokens=trained, trained_tokens_per_s=round(trained / r["wall_s"], 1),
             loop_trained_tokens_per_s=round(trained / s["train_runtime_s"], 1),
             held_out_loss=round(held_out_loss(prep["model_dir"], final, prep["held_out"]), 4))
    for noisy in ("stdout", "stderr"):
        r.pop(noisy)
    shutil.rmtree(out, ignore_errors=True)
    return r


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] in (["_hf"], ["_ftflow"]):
        spec = json.loads(Path(argv[1]).read_text())
        return hf_rank(spec) if argv[0] == "_hf" else ftflow_process(spec)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1024, help="training samples (one epoch)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (>= 3), each runs every method once in a random order")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the method order")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--baseline", metavar="REV", help="also run ftflow's train stage from the source of git commit REV "
                                                       "(method ftflow_base), to measure a change side by side")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS) or not methods:
        ap.error(f"--methods: choose from {list(METHODS)}")
    baseline = None
    if args.baseline:
        import subprocess

        try:
            baseline = subprocess.run(["git", "rev-parse", "--verify", args.baseline + "^{commit}"], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as err:
            ap.error(f"--baseline {args.baseline}: not a commit of this repository ({getattr(err, 'stderr', err)})")
        methods.append("ftflow_base")
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (a median and a spread need three)")
    logging.basicConfig(level=logging.WARNING)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    rng = random.Random(args.seed)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    failed: dict[str, str] = {}
    orders = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-train-") as tmp:
        tmp = Path(tmp)
        prep = prepare(args.samples, tmp)
        if baseline:
            import subprocess

            src = tmp / f"baseline-{baseline[:10]}"
            src.mkdir()
            archive = subprocess.run(["git", "archive", "--format=tar", baseline], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            prep.update(baseline_src=str(src), baseline_commit=baseline)
        build_deepspeed_ops()
        for k in range(args.repeats):
            order = shuffled(methods, rng)
            orders.append(order)
            for m in order:
                if m in failed:
                    continue
                try:
                    runs[m].append(run_method(m, prep, tmp, k))
                except Exception as err:  # noqa: BLE001 - one method failing must not lose the others' runs
                    failed[m] = str(err)[-3000:]
                    print(f"  repeat {k + 1}/{args.repeats} {m} FAILED: {failed[m][-600:]}", file=sys.stderr, flush=True)
                    continue
                x = runs[m][-1]
                print(f"  repeat {k + 1}/{args.repeats} {m:<12}{x['wall_s']:>8.1f} s wall, loop {x['train_runtime_s']:.1f} s, "
                      f"held-out {x['held_out_loss']:.3f}", file=sys.stderr, flush=True)
            summarize(args, argv, methods, failed, runs, orders, prep, t_start)

    result = summarize(args, argv, methods, failed, runs, orders, prep, t_start)
    print(format_table(result))  # the benchmark's report is its output
    return 0


def summarize(args, argv, methods, failed, runs, orders, prep, t_start) -> dict:
    """The result of the repeats done so far, written to args.out (after every repeat, so a run
    stopped early still leaves its figures, marked with how many repeats it holds)."""
    methods = [m for m in methods if m not in failed and runs[m]]

    def per(m: str, key: str) -> list[float]:
        return [r[key] for r in runs[m]]

    summary = {m: {key: spread(per(m, key), 4 if "loss" in key else 1) for key in
                   ("wall_s", "train_runtime_s", "trained_tokens_per_s", "loop_trained_tokens_per_s", "held_out_loss",
                    "train_loss", "peak_rss_mb")} | {"steps": runs[m][0]["steps"], "trained_tokens": runs[m][0]["trained_tokens"]}
               for m in methods}
    ratios: dict[str, list[float]] = {}
    trl = [m for m in ("trl_packed", "trl_grouped") if m in methods]
    if "ftflow" in methods:
        for m in [m for m in methods if m != "ftflow"]:
            for basis, key in (("wall", "trained_tokens_per_s"), ("loop", "loop_trained_tokens_per_s")):
                ratios[f"ftflow_vs_{m}_{basis}"] = [round(f / o, 2) for f, o in zip(per("ftflow", key), per(m, key))]
        for basis, key in (("wall", "trained_tokens_per_s"), ("loop", "loop_trained_tokens_per_s")):
            if trl:  # TRL's best in each repeat
                ratios[f"ftflow_vs_trl_best_{basis}"] = [round(f / max(per(m, key)[i] for m in trl), 2)
                                                         for i, f in enumerate(per("ftflow", key))]
    goals = {}
    if "ftflow" in methods and "seed" in methods:
        goals[">= 3x seed (wall)"] = statistics.median(ratios["ftflow_vs_seed_wall"]) >= 3
    if "ftflow" in methods and trl:
        best_loss = min(summary[m]["held_out_loss"]["median"] for m in trl)
        goals[">= 1.2x TRL's best (wall)"] = statistics.median(ratios["ftflow_vs_trl_best_wall"]) >= 1.2
        goals["held-out loss <= TRL's best"] = summary["ftflow"]["held_out_loss"]["median"] <= best_loss
    result = {
        "command": "python -m bench.bench_train " + " ".join(argv), "samples": args.samples, "repeats": args.repeats, "repeats_done": min(len(runs[m]) for m in methods),
        "max_length": MAX_LEN, "ranks": RANKS, "micro_batch": MICRO, "trl_rows_per_rank": prep["trl_rows_per_rank"],
        "schedule": SCHEDULE, "model_shape": MODEL_SHAPE, "data": prep["data"], "orders": orders,
        "baseline_commit": prep.get("baseline_commit"),
        "summary": summary, "ratios_per_repeat": ratios, "ratios": {k: spread(v, 2) for k, v in ratios.items()},
        "goals": goals, "failed": failed, "load": load_verdict([r for m in methods for r in runs[m]]), "host": host(),
        "seconds": round(time.perf_counter() - t_start, 1), "out": str(args.out), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(r: dict) -> str:
    d = r["data"]
    partial = "" if r["repeats_done"] >= r["repeats"] else f" (STOPPED EARLY: {r['repeats_done']} of {r['repeats']} repeats)"
    lines = [f"train{partial}: {d['samples']:,} samples ({d['tokens']:,} tokens, {d['trained_tokens']:,} trained, median length "
             f"{d['median_len']}), one epoch, {r['ranks']} ranks, ZeRO-3, {r['repeats']} repeats in random order; median [min-max]",
             "",
             f"{'method':<13}{'wall s':>20}{'loop s':>20}{'trained tok/s (wall)':>24}{'(loop)':>22}"
             f"{'held-out loss':>26}{'peak RSS MB':>13}"]
    for m, s in r["summary"].items():
        lines.append(f"{m:<13}{fmt(s['wall_s'], digits=1):>20}{fmt(s['train_runtime_s'], digits=1):>20}"
                     f"{fmt(s['trained_tokens_per_s'], digits=0):>24}{fmt(s['loop_trained_tokens_per_s'], digits=0):>22}"
                     f"{fmt(s['held_out_loss'], digits=3):>26}{s['peak_rss_mb']['median']:>13.0f}")
    lines.append("")
    if r.get("baseline_commit"):
        lines.append(f"ftflow_base: the train stage of commit {r['baseline_commit'][:10]}, same settings")
    for k, v in r["ratios_per_repeat"].items():
        lines.append(f"{k:<30}{fmt(r['ratios'][k])}x   per repeat {v}")
    for m, err in r["failed"].items():
        lines.append(f"{m}: FAILED, no figures: {err.strip().splitlines()[-1][:200] if err.strip() else '?'}")
    for g, ok in r["goals"].items():
        verdict = "met" if ok else "NOT met"
        if r["load"]["loaded"] or r["repeats_done"] < 3:
            verdict = f"not judged (loaded host or < 3 repeats; this run: {verdict})"
        lines.append(f"goal {g}: {verdict}")
    lines += [load_line(r["load"]), f"written to {r['out']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
