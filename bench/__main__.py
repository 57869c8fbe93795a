"""The benchmark suite: every figure from the product path, each method a fresh process timed as the
user waits; one summary table at the end (never part of `make test`).

    python -m bench                  # full sizes (an hour or more on a 2-core CPU)
    python -m bench --quick          # smaller inputs, still >= 3 repeats of every method
    python -m bench --only train,pipeline

Parts (each also runs alone as `python -m bench.bench_X`, see its docstring):
- tokenize: `ftflow tokenize` cold, on one tokenizer thread, and a cache hit vs seed 000's loop;
- train: the seed recipe, TRL SFTTrainer (packed bfd, length-grouped) and ftflow's train stage
  (`tasks.train.run_training`), 2 ranks, ZeRO-3: trained tokens/s, held-out loss, peak RSS;
- inference: seed 004's one-prompt loop vs `generate_batch`, replies of varied lengths, compared;
- pipeline: (process wall - stage compute) / process wall of `ftflow run configs/demo.yaml`.
Not in the default suite (micro-benchmarks of one function, not a product path; `--only` runs them):
- convert: the data stage's rows/s and peak RSS; kernels: torch.compile, bf16, chunked loss;
- memory: peak RSS of the LoRA export, streamed merge and registration on a 152M-parameter model;
- gpu: `bench.gpu`, the real launcher and worker on a Qwen2.5-0.5B-shaped full fine-tune and a 7B-shaped
  LoRA slice, MFU (skipped with one line when there is no CUDA).
Every part records the host's load (`bench/common.py`) and its table says LOADED HOST when other
processes used more than a quarter of a core. Each part writes bench/results/<part>.json; the
suite writes bench/results/suite.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = {  # part: (module, full-size args, quick args, result file)
    "tokenize": ("bench.bench_tokenize", [], ["--rows", "10000", "--repeats", "3"], "tokenize.json"),
    "train": ("bench.bench_train", [], ["--samples", "64", "--repeats", "3"], "train.json"),
    "inference": ("bench.bench_inference", [], ["--max-samples", "32", "--max-new-tokens", "32", "--repeats", "3"], "inference.json"),
    "pipeline": ("bench.bench_pipeline", [], ["--quick"], "pipeline.json"),
    "convert": ("bench.bench_convert", [], ["--rows", "100000"], "convert.json"),
    "kernels": ("bench.bench_kernels", [], ["--repeats", "1", "--samples", "24", "--tokens", "1024"], "kernels.json"),
    "gpu": ("bench.gpu", [], ["--steps", "10"], "gpu.json"),
    "memory": ("bench.bench_memory", [], [], "memory.json"),
}
DEFAULT = ("tokenize", "train", "inference", "pipeline")


def _loaded(r: dict) -> str:
    return "  (LOADED HOST)" if r.get("load", {}).get("loaded") else ""


def headline(part: str, r: dict) -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows of one part's JSON for the summary table."""
    from bench.common import fmt

    if part == "tokenize":
        s = r["summary"]
        return [("tokenize: ftflow cold vs seed loop (wall)", f"{fmt(r['ratios']['cold_vs_seed'])}x{_loaded(r)}", ">= 5x"),
                ("tokenize: cache hit (wall)", f"{fmt(s['hit']['wall_s'])} s{_loaded(r)}", "< 1 s")]
    if part == "train":
        rows = [(f"train {m}", f"{fmt(x['trained_tokens_per_s'], digits=0)} trained tok/s (wall), held-out loss "
                 f"{fmt(x['held_out_loss'], digits=3)}, RSS {x['peak_rss_mb']['median']:,.0f} MB{_loaded(r)}", "")
                for m, x in r["summary"].items()]
        q = r["ratios"]
        if "ftflow_vs_seed_wall" in q:
            rows.append(("train ftflow vs seed (wall)", f"{fmt(q['ftflow_vs_seed_wall'])}x{_loaded(r)}", ">= 3x"))
        if "ftflow_vs_trl_best_wall" in q:
            rows.append(("train ftflow vs TRL's best (wall)", f"{fmt(q['ftflow_vs_trl_best_wall'])}x{_loaded(r)}", ">= 1.2x"))
        return rows
    if part == "inference":
        return [("inference batched vs seed loop (wall)", f"{fmt(r['ratios']['wall'])}x, outputs equal: "
                 f"{r['outputs_equal']}{_loaded(r)}", "")]
    if part == "pipeline":
        share = r["summary"]["process_overhead_share"]
        pct = {k: (100 * v if k != "n" else v) for k, v in share.items()}
        return [("pipeline orchestration (wall - stages) / wall", f"{fmt(pct, '%', 1)}{_loaded(r)}", "<= 10%")]
    if part == "gpu":
        if "skipped" in r:
            return [("GPU check (bench.gpu)", f"skipped: {r['skipped']}", "MFU >= 40% (0.5B full)")]
        rows = []
        for key in ("full_0.5b", "lora_7b_slice"):
            x = r.get(key)
            if x:
                mfu = f"{x['mfu']:.1%}" if x.get("mfu") is not None else "n/a"
                rows.append((f"GPU {key}", f"{x['tokens_per_s']:,} tok/s, MFU {mfu}, peak {x['peak_memory_gib']} GiB",
                             "MFU >= 40%" if key == "full_0.5b" else ""))
        return rows
    if part == "kernels":
        rows = []
        if "train_step" in r:
            med, diff = r["train_step"]["median"], r["train_step"]["max_abs_loss_diff_vs_eager"]
            for v in ("compiled", "bf16"):
                if v in med:
                    rows.append((f"kernels {v} vs eager step", f"{med['eager']['step_s'] / med[v]['step_s']:.2f}x "
                                 f"(first step {med[v]['first_step_s']:.1f}s, max |loss diff| {diff[v]:.1e})", ""))
        if "loss" in r:
            med = r["loss"]["median"]
            rows.append(("kernels chunked vs full LM-head loss", f"{med['full']['seconds'] / med['chunked']['seconds']:.2f}x speed, "
                         f"{med['chunked']['peak_over_inputs_mb'] / med['full']['peak_over_inputs_mb']:.2f}x peak memory", ""))
        return rows
    if part == "convert":
        big = max(r["runs"], key=lambda x: x["rows"])
        return [("convert rows/s", f"{big['rows_per_s']:,.0f} ({big['rows']:,} rows, peak RSS {big['peak_rss_mb']:.0f} MB)", "")]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes for every part")
    ap.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated parts of {list(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")

    started = datetime.now(timezone.utc)
    suite: dict = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "parts": {}}
    rows: list[tuple[str, str, str]] = []
    for part in parts:
        module, full, quick, result_file = PARTS[part]
        cmd = [sys.executable, "-m", module, *(quick if args.quick else full)]
        print(f"== {part}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress (stderr) shows as it runs
        seconds = round(time.perf_counter() - t0, 1)
        entry: dict = {"command": "python " + " ".join(cmd[1:]), "seconds": seconds, "exit": proc.returncode}
        if proc.returncode != 0:
            entry["error"] = f"exit {proc.returncode}; its error is printed above. stdout tail: {proc.stdout[-2000:]}"
            rows.append((part, f"FAILED (exit {proc.returncode}), see suite.json", ""))
        else:
            path = RESULTS / result_file
            if part == "gpu" and (not path.exists() or path.stat().st_mtime < time.time() - seconds - 1):
                result = {"skipped": "no CUDA device here"}  # bench.gpu writes nothing when it skips
            else:
                result = json.loads(path.read_text())
            entry["result"] = result
            rows += headline(part, result)
        print(proc.stdout, flush=True)  # the part's own table
        print(f"   {seconds}s, exit {proc.returncode}", flush=True)
        suite["parts"][part] = entry

    suite["seconds"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    suite["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "suite.json").write_text(json.dumps(suite, indent=2, default=str) + "\n")

    width = max(len(r[0]) for r in rows) + 2 if rows else 20
    lines = ["", f"ftflow benchmark suite{' (--quick)' if args.quick else ''}, {started:%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {suite['seconds']:.0f}s", ""]
    lines += [f"{name:<{width}}{value}" + (f"   [goal {goal}]" if goal else "") for name, value, goal in rows]
    lines.append(f"\nwritten to {RESULTS / 'suite.json'}")
    print("\n".join(lines))  # the suite's report is its output
    return 0 if all(e["exit"] == 0 for e in suite["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
