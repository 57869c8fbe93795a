"""Throughput and memory of the data stage (a benchmark, not a test).

    python -m bench.bench_convert                # 1,000,000 alpaca rows, then 250,000
    python -m bench.bench_convert --rows 200000

Each size runs in a fresh process, so its peak RSS is its own: with streaming readers, memory
does not grow with the file, except the duplicate index (8 bytes a row for content hashes).
Results go to bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "convert.json"
WORDS = "床前明月光 疑是地上霜 the quick brown fox jumps over a lazy dog 春眠不觉晓 处处闻啼鸟".split()


def write_alpaca(path: Path, rows: int) -> int:
    """Write `rows` distinct alpaca rows (~200 bytes each); return the file size."""
    with open(path, "w", encoding="utf-8") as f:
        batch = []
        for i in range(rows):
            words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 7 + 3))
            batch.append(
                json.dumps(
                    {"instruction": f"Continue the poem #{i}:", "input": words, "output": f"{words[::-1]} ({i})"},
                    ensure_ascii=False,
                )
            )
            if len(batch) == 10_000:
                f.write("\n".join(batch) + "\n")
                batch = []
        if batch:
            f.write("\n".join(batch) + "\n")
    return path.stat().st_size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(src: Path, out: Path) -> None:
    """Convert one file in this (fresh) process; print one JSON line of measurements."""
    from tasks.convert import convert_dataset

    before = peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    report = convert_dataset([src], [], out, eval_fraction=0.1).report
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"rows": report["rows_in"], "rows_out": report["rows_out"], "seconds": seconds,
                      "cpu_seconds": cpu, "rows_per_s": report["rows_in"] / seconds,
                      "rows_per_cpu_s": report["rows_in"] / cpu, "rss_after_import_mb": before,
                      "peak_rss_mb": peak_rss_mb()}))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return {}
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        for rows in (args.rows, args.rows // 4):
            src = Path(tmp) / f"alpaca_{rows}.jsonl"
            size = write_alpaca(src, rows)
            done = subprocess.run(
                [sys.executable, "-m", "bench.bench_convert", "--worker", str(src), str(Path(tmp) / f"out_{rows}")],
                check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
            runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "input_mb": size / 2**20})
            src.unlink()
    # On a shared machine wall time includes waiting for a core; CPU time is the converter's own cost.
    print(f"{'rows':>10} {'input MB':>9} {'seconds':>8} {'rows/s':>9} {'CPU s':>7} {'rows/CPU s':>11} "
          f"{'RSS after import MB':>20} {'peak RSS MB':>12}")  # fmt: skip
    for r in runs:
        print(f"{r['rows']:>10,} {r['input_mb']:>9.1f} {r['seconds']:>8.2f} {r['rows_per_s']:>9,.0f} "
              f"{r['cpu_seconds']:>7.2f} {r['rows_per_cpu_s']:>11,.0f} "
              f"{r['rss_after_import_mb']:>20.1f} {r['peak_rss_mb']:>12.1f}")  # fmt: skip
    result = {
        "benchmark": "convert_dataset, alpaca JSONL, eval_fraction 0.1",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
