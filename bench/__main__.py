"""The benchmark suite: every part in its own process, one table at the end (never part of `make test`).

    python -m bench                  # full sizes (tens of minutes on a 2-core CPU)
    python -m bench --quick          # smoke sizes: every part runs, figures are indicative only
    python -m bench --only train,pipeline

Parts (each also runs alone as `python -m bench.bench_X`, see its docstring):
- convert: data stage rows/s and peak RSS;
- tokenize: seed 000's loop vs ftflow cold build vs cache hit;
- inference: seed 004's one-prompt loop vs batched generation;
- train: seed recipe vs TRL SFTTrainer vs ftflow's training path (trained tokens/s, loss, RSS);
- train_gpu: Qwen2.5-0.5B shape, bf16, packed, MFU (skipped with a message when there is no CUDA);
- kernels: torch.compile, bf16 autocast and a chunked LM-head loss against the eager fp32 step;
- pipeline: orchestration overhead of `ftflow run` (flow wall time minus the stages' own compute).
Each part writes bench/results/<part>.json; the suite writes bench/results/suite.json.
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
    "convert": ("bench.bench_convert", [], ["--rows", "100000"], "convert.json"),
    "tokenize": ("bench.bench_tokenize", [], ["--rows", "2000", "--repeats", "3"], "tokenize.json"),
    "inference": ("bench.bench_inference", ["--threads", "1"], ["--threads", "1", "--max-new-tokens", "32"], "inference.json"),
    "train": ("bench.bench_train", [], ["--quick"], "train.json"),  # --quick writes train_quick.json
    "train_gpu": ("bench.bench_train", ["--gpu"], ["--gpu"], "train_gpu.json"),
    "kernels": ("bench.bench_kernels", [], ["--repeats", "1", "--samples", "24", "--tokens", "1024"], "kernels.json"),
    "pipeline": ("bench.bench_pipeline", [], ["--quick"], "pipeline.json"),
}


def headline(part: str, r: dict) -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows of one part's JSON for the summary table."""
    if part == "convert":
        big = max(r["runs"], key=lambda x: x["rows"])
        return [("convert rows/s", f"{big['rows_per_s']:,.0f} ({big['rows']:,} rows, peak RSS {big['peak_rss_mb']:.0f} MB)", "")]
    if part == "tokenize":
        return [("tokenize cold vs seed loop", f"{r['cold_vs_seed']['wall']}x wall, {r['cold_vs_seed']['cpu']}x cpu", ">= 5x"),
                ("tokenize cache hit vs cold", f"{r['hit_vs_cold']['wall']}x wall", ">= 20x")]
    if part == "inference":
        return [("batched vs per-prompt generation", f"{r['speedup']}x (outputs equal: {r['outputs_equal']})", ">= 5x")]
    if part == "train":
        rows = []
        for m, x in r["methods"].items():
            if "error" in x:
                rows.append((f"train {m}", f"FAILED: {x['error'][:60]}", ""))
                continue
            rows.append((f"train {m}", f"{x['trained_tokens_per_s']:,.0f} trained tok/s, {x['tokens_per_s']:,.0f} tok/s, "
                         f"pad {100 * x['padding_share']:.0f}%, RSS {x['peak_rss_mb']:,.0f} MB, "
                         f"loss {x['train_loss_last3']:.3f}/{x['held_out_loss']:.3f}", ""))
        ratios = r["ratios"]
        rows.append(("train ftflow best vs seed", f"{ratios['ftflow_best_vs_seed']}x", ">= 3x"))
        rows.append(("train ftflow best vs TRL best", f"{ratios['ftflow_best_vs_trl_best']}x", ">= 1.2x"))
        return rows
    if part == "train_gpu":
        if "skipped" in r:
            return [("train GPU (0.5B, bf16, packed)", "skipped: no CUDA device", "MFU >= 40%")]
        return [("train GPU (0.5B, bf16, packed)", f"{r['trained_tokens_per_s']:,} trained tok/s, MFU {r['mfu_vs_spec']} of "
                 f"{r['spec_bf16_tflops']} TFLOP/s ({r['mfu_vs_measured_matmul']} of measured matmul), "
                 f"{r['peak_memory_gib']} GiB", "MFU >= 40%")]
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
    if part == "pipeline":
        m = r["median"]
        return [("pipeline orchestration overhead", f"{m['overhead_s']:.1f}s of {m['wall_s']:.1f}s wall = "
                 f"{100 * m['overhead_share_of_wall']:.1f}%", "<= 10%")]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes for every part")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {list(PARTS)}")
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
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        entry: dict = {"command": "python " + " ".join(cmd[1:]), "seconds": seconds, "exit": proc.returncode}
        if proc.returncode != 0:
            entry["error"] = (proc.stderr or proc.stdout)[-2000:]
            rows.append((part, f"FAILED (exit {proc.returncode}), see suite.json", ""))
        else:
            if args.quick and part == "train":
                result_file = "train_quick.json"
            result = json.loads((RESULTS / result_file).read_text())
            entry["result"] = result
            rows += headline(part, result)
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
